// Replays a recorded sequence of PyTorch operator calls from C++ (engine/cpu_graphs.py records it).
//
// Why: a CPU decode step of a small batch is a few hundred operator calls, and from Python each
// costs microseconds of interpreter, module and binding work between the kernels. Replayed here,
// a call is one boxed dispatch: the same operators with the same arguments, so the same results.
//
// A program is a list of steps. A step is one operator (a handle found once), its arguments as a
// prepared stack (constants: weights, caches, the static input buffers, sizes), the arguments that
// are results of earlier steps (patched in before the call), where its returns go, and which
// values are dropped after it (their last use), so intermediates are freed as eagerly as they are.

#include <torch/extension.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>

#include <string>
#include <tuple>
#include <vector>

namespace {

struct Use {  // an argument (or one element of a Tensor[] argument) that is an earlier step's result
  int64_t position;
  int64_t element;  // -1: the argument itself
  int64_t value;
};

struct Result {  // where a return goes
  int64_t position;
  int64_t element;  // -1: the return itself; else one element of a returned Tensor[]
  int64_t value;
};

struct Step {
  c10::OperatorHandle op;
  std::vector<c10::IValue> arguments;
  std::vector<Use> uses;
  std::vector<Result> results;
  std::vector<int64_t> releases;
};

// A Python number passed where the schema has a Tensor (`x * 16` reaches the dispatcher so) becomes
// what Python's argument parser makes of it: a 0-dim "wrapped number" tensor, which type promotion
// treats as a Python scalar (an int tensor times 2.5 is float32, not float64).
py::tuple wrap_numbers(const c10::FunctionSchema& schema, py::tuple args) {
  py::list out;
  for (size_t i = 0; i < args.size(); ++i) {
    py::handle a = args[i];
    bool number = py::isinstance<py::int_>(a) || py::isinstance<py::float_>(a) || py::isinstance<py::bool_>(a);
    if (number && i < schema.arguments().size() &&
        schema.arguments()[i].type()->kind() == c10::TypeKind::TensorType) {
      at::Scalar s = py::isinstance<py::bool_>(a) ? at::Scalar(a.cast<bool>())
                     : py::isinstance<py::int_>(a) ? at::Scalar(a.cast<int64_t>())
                                                   : at::Scalar(a.cast<double>());
      at::Tensor t = c10::scalar_to_tensor(s);
      t.unsafeGetTensorImpl()->set_wrapped_number(true);
      out.append(py::cast(t));
    } else {
      out.append(a);
    }
  }
  return py::tuple(out);
}

class Program {
 public:
  explicit Program(int64_t num_values) : values_(num_values) {}

  void add(const std::string& name, const std::string& overload, py::tuple args, py::dict kwargs,
           const std::vector<std::tuple<int64_t, int64_t, int64_t>>& uses,
           const std::vector<std::tuple<int64_t, int64_t, int64_t>>& results,
           const std::vector<int64_t>& releases) {
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    args = wrap_numbers(op.schema(), args);
    // The schema's own conversion, as torch.ops calls do: defaults filled in, keywords placed.
    torch::jit::Stack stack = torch::jit::createStackForSchema(op.schema(), args, kwargs, std::nullopt);
    Step step{op, std::move(stack), {}, {}, releases};
    for (const auto& [position, element, value] : uses) {
      TORCH_CHECK(position >= 0 && position < (int64_t)step.arguments.size(), "argument out of range");
      TORCH_CHECK(value >= 0 && value < (int64_t)values_.size(), "value out of range");
      step.uses.push_back({position, element, value});
      // The recording's own tensor must not stay alive in the program: only the patched one runs.
      if (element < 0) {
        step.arguments[position] = c10::IValue();
      } else {  // one element of a list argument: a copy of the list without it
        auto list = step.arguments[position].toList().copy();
        list.set(element, c10::IValue(at::Tensor()));
        step.arguments[position] = std::move(list);
      }
    }
    for (const auto& [position, element, value] : results) {
      TORCH_CHECK(value >= 0 && value < (int64_t)values_.size(), "value out of range");
      step.results.push_back({position, element, value});
    }
    steps_.push_back(std::move(step));
  }

  at::Tensor run(int64_t output) {
    TORCH_CHECK(output >= 0 && output < (int64_t)values_.size(), "output out of range");
    py::gil_scoped_release no_gil;  // the server's event loop runs meanwhile
    c10::InferenceMode inference;
    torch::jit::Stack stack;
    for (size_t index = 0; index < steps_.size(); ++index) {
      const Step& step = steps_[index];
      stack = step.arguments;
      for (const Use& use : step.uses) {
        if (use.element < 0) {
          stack[use.position] = values_[use.value];
        } else {  // a fresh list: the prepared one is shared by every run
          auto list = stack[use.position].toList().copy();  // Tensor[] or Tensor?[]
          list.set(use.element, values_[use.value]);
          stack[use.position] = std::move(list);
        }
      }
      try {
        step.op.callBoxed(stack);
      } catch (const std::exception& e) {
        for (auto& v : values_) v = c10::IValue();
        TORCH_CHECK(false, "replayed step ", index, " (", step.op.schema().name(), ") failed: ", e.what());
      }
      for (const Result& r : step.results) {
        values_[r.value] = r.element < 0 ? stack[r.position] : stack[r.position].toList().get(r.element);
      }
      for (int64_t v : step.releases) values_[v] = c10::IValue();
    }
    at::Tensor out = values_[output].toTensor();
    for (auto& v : values_) v = c10::IValue();
    return out;
  }

  int64_t size() const { return (int64_t)steps_.size(); }

 private:
  std::vector<Step> steps_;
  std::vector<c10::IValue> values_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Program>(m, "Program")
      .def(py::init<int64_t>())
      .def("add", &Program::add)
      .def("run", &Program::run)
      .def("__len__", &Program::size);
}
