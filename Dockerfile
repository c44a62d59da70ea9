# grounded-serve on the official Ray GPU image. Not built in CI (no Docker engine there); linted by
# tests/test_deploy_configs.py with hadolint.
#   docker build -t grounded-serve:0.1.0 .
#   docker run --gpus all -p 9090:9090 -e USE_SAM=true grounded-serve:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/grounded-serve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -e .

ENV HF_HOME=/home/ray/models/hf \
    CHECKPOINT_CACHE_DIR=/home/ray/models/checkpoints \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0
EXPOSE 9090 8265
# Listen on all interfaces inside the container; everything else comes from configs/serve.yaml and env.
# `grounded-serve check` first: a refused setting stops the container with the reason, instead of `serve run`
# running on with no application.
CMD ["bash", "-c", "sed 's/host: 127.0.0.1 /host: 0.0.0.0 /' configs/serve.yaml > /tmp/serve.yaml && grounded-serve check /tmp/serve.yaml && exec serve run /tmp/serve.yaml"]
