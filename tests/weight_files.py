"""Random-weight files in the published layouts (Keras .h5, timm / torchvision safetensors), made without
Keras, TensorFlow or torch, for the download/convert/cache tests and the README test.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import pathlib
import threading
import time

import h5py
import numpy as np

from vgg_jax import models
from vgg_jax.weights import formats as weight_formats

TINY = dict(width_multiplier=1 / 16, fc_width=16, num_classes=1000, crop_size=224)


def random_params(variant: str, seed: int = 0, *, head: bool = True, **hyper) -> dict[str, dict[str, np.ndarray]]:
    """He-scaled kernels and non-zero biases, in vgg_jax's layout (HWIO, fc (in, out))."""
    hyper = dict(TINY, **hyper)
    rng = np.random.default_rng(seed)
    shapes = weight_formats.expected_shapes(variant, **hyper)
    params = {}
    for layer in models.layer_names(variant) if head else models.conv_layer_names(variant):
        kernel_shape = shapes[layer]["kernel"]
        fan_in = int(np.prod(kernel_shape[:-1]))
        params[layer] = {
            "kernel": (rng.standard_normal(kernel_shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
            "bias": (0.1 * rng.standard_normal(shapes[layer]["bias"])).astype(np.float32),
        }
    return params


def write_keras_h5(path: pathlib.Path, params: dict) -> pathlib.Path:
    """The layout of the published ``vgg16_weights_tf_dim_ordering_tf_kernels(_notop).h5`` (groups at the root)."""
    names = {"fc6": "fc1", "fc7": "fc2", "fc8": "predictions"}
    with h5py.File(path, "w") as f:
        layer_names = [b"input_1"]
        f.create_group("input_1").attrs["weight_names"] = []
        for layer, leaves in params.items():
            keras = names.get(layer) or "block{}_conv{}".format(*layer[4:].split("_"))
            group = f.create_group(keras)
            group.attrs["weight_names"] = [f"{keras}_W_1:0".encode(), f"{keras}_b_1:0".encode()]
            group.create_dataset(f"{keras}_W_1:0", data=leaves["kernel"])
            group.create_dataset(f"{keras}_b_1:0", data=leaves["bias"])
            layer_names.append(keras.encode())
        f.attrs["layer_names"] = layer_names
    return path


def torchvision_state(params: dict) -> dict[str, np.ndarray]:
    """vgg_jax-layout parameters as a torchvision state dict (OIHW, fc6 rows in NCHW order)."""
    variant = "E" if "conv5_4" in params else "D" if "conv5_3" in params else "B" if "conv1_2" in params else "A"
    state = {}
    for layer in models.conv_layer_names(variant):
        key = weight_formats._torchvision_key(variant, layer)
        state[f"{key}.weight"] = np.ascontiguousarray(params[layer]["kernel"].transpose(3, 2, 0, 1))
        state[f"{key}.bias"] = params[layer]["bias"]
    last = params[models.conv_layer_names(variant)[-1]]["kernel"].shape[-1]
    fc6 = params["fc6"]["kernel"]  # (h*w*c, out) in NHWC order
    window = int(round((fc6.shape[0] / last) ** 0.5))
    fc6 = fc6.reshape(window, window, last, -1).transpose(3, 2, 0, 1).reshape(fc6.shape[1], -1)
    state["classifier.0.weight"], state["classifier.0.bias"] = np.ascontiguousarray(fc6), params["fc6"]["bias"]
    for layer, index in (("fc7", 3), ("fc8", 6)):
        state[f"classifier.{index}.weight"] = np.ascontiguousarray(params[layer]["kernel"].T)
        state[f"classifier.{index}.bias"] = params[layer]["bias"]
    return state


def timm_state(state: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
    """torchvision keys → timm's (``pre_logits.fc1/fc2`` as convolutions, ``head.fc``), as on the HF hub."""
    out = {k: v for k, v in state.items() if k.startswith("features.")}
    fc6 = state["classifier.0.weight"]
    out["pre_logits.fc1.weight"] = fc6.reshape(fc6.shape[0], -1, window, window)
    out["pre_logits.fc1.bias"] = state["classifier.0.bias"]
    out["pre_logits.fc2.weight"] = state["classifier.3.weight"][:, :, None, None]
    out["pre_logits.fc2.bias"] = state["classifier.3.bias"]
    out["head.fc.weight"], out["head.fc.bias"] = state["classifier.6.weight"], state["classifier.6.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def digest(path: pathlib.Path, algorithm: str = "sha256") -> str:
    return hashlib.new(algorithm, pathlib.Path(path).read_bytes()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; records every GET; '/truncated/NAME' promises the whole file and sends half."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        time.sleep(self.server.delay)  # so that concurrent first calls overlap
        if self.path.startswith("/truncated/"):
            data = (pathlib.Path(self.directory) / self.path.split("/", 2)[2]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(directory: pathlib.Path, delay: float = 0.0):
    """An HTTP server on 127.0.0.1 (loopback only) for `directory`; yields it (``.url``, ``.requests``)."""
    handler = functools.partial(_Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests, server.delay = [], delay
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
