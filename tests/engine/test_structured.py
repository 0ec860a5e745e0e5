"""Grammar-constrained output on the real model: whatever the sampler draws, the text is JSON
that validates against the requested schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmserve import SamplingParams
from lmserve.errors import InvalidParameter
from lmserve.sampling_params import StructuredOutput
from tests.conftest import chat_ids

PERSON = "Describe a fictional person as JSON."
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog", "fish"]}}}}


def test_json_schema_holds_under_sampling(smollm):
    spec = StructuredOutput.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, structured_output=spec) for s in range(4)]
    outs = smollm.generate([chat_ids(smollm, PERSON)] * 4, params)
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "eos", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_json_object_with_n_choices(smollm):
    params = SamplingParams(n=2, max_tokens=200, temperature=0.8, seed=3,
                            structured_output=StructuredOutput("json_object"))
    out = smollm.generate([chat_ids(smollm, PERSON)], params)[0]
    assert len(out.outputs) == 2
    for o in out.outputs:
        assert o.finish_reason == "eos", o.text  # ample max_tokens: the object closed and the grammar ended it
        jsonschema.validate(json.loads(o.text), {"type": "object"})


def test_unconstrained_output_is_not_json(smollm):
    # The constraint is what makes the JSON: without it the same request answers in prose.
    o = smollm.generate([chat_ids(smollm, PERSON)], SamplingParams(max_tokens=30, temperature=0.0))[0].outputs[0]
    with pytest.raises(ValueError):
        json.loads(o.text)


def test_bad_schema_is_rejected_before_running(smollm):
    with pytest.raises(InvalidParameter) as e:
        smollm.generate([[1, 2, 3]], SamplingParams(structured_output=StructuredOutput("json_schema", "{not json")))
    assert e.value.param == "response_format"
