# hcd GPU image: the official TensorFlow 2.21.0 GPU image plus hcd and its pinned dependencies.
#
#   docker build -t hcd .                                            # GPU (default)
#   docker build -t hcd:cpu --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 .   # CPU-only hosts
#
#   docker run --gpus all -v $DATA:/workspace/data:ro -v $WS:/workspace hcd hcd_train --flagfile=model1.flags
#   docker run -v $DATA:/workspace/data:ro -v $WS:/workspace hcd tools/make_shards --data_dir=data --split=train --out_dir=shards
#
# The TensorFlow version of the base must match setup.cfg's pin (tensorflow==2.21.0).
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HCD_HOME=/opt/hcd

WORKDIR /opt/hcd
# Dependencies first (setup.cfg pins them) so code edits do not reinstall TensorFlow's neighbours.
COPY setup.cfg pyproject.toml README.md ./
COPY hcd/__init__.py hcd/__init__.py
RUN python3 -m pip install --no-cache-dir pip==24.3.1 \
    && python3 -m pip install --no-cache-dir . \
    && python3 -m pip uninstall -y hcd
COPY hcd hcd
COPY tools tools
COPY bench bench
COPY docker/entrypoint.sh /usr/local/bin/hcd-entrypoint
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && chmod 0755 /usr/local/bin/hcd-entrypoint tools/* \
    && python3 -c "import tensorflow as tf, imagecodecs, hcd; print('tf', tf.__version__)"

# Run as an unprivileged user; /workspace is where the user mounts data and outputs.
RUN groupadd --gid 1000 hcd && useradd --uid 1000 --gid hcd --create-home --shell /bin/bash hcd \
    && mkdir -p /workspace && chown hcd:hcd /workspace
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["/usr/local/bin/hcd-entrypoint"]
CMD ["hcd_train", "--helpfull"]
