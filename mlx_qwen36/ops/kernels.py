"""Custom Metal kernels: where they run, how their sources load, and what happens when one fails or is slow.

`MLX_QWEN36_KERNELS` chooses:
- unset or `auto`: on a Metal GPU, each op uses its kernel for a given shape only if the kernel is measured faster
  than the op's pure-MLX reference on this machine (timed once, on first use, remembered per device and shape, also
  across runs in `~/.cache/mlx_qwen36/kernel_choices.json`). A slow kernel on some chip never slows a user down.
  Elsewhere, no kernel runs.
- `0`: no custom kernel anywhere: every op takes its reference.
- `1`: every op takes its kernel where it supports the case: the real one on Metal, and elsewhere the project's CPU
  emulator (`mlx_qwen36.metal.emulator`), which compiles the same Metal source as C++ and runs it thread by thread.
  That is how the kernels are tested on Linux; it is far too slow for anything else.

A kernel that fails (it does not compile, or its launch raises) is reported once and its op falls back to the
reference for the rest of the process. On Metal a kernel compiles at its first evaluation, so the first use of each
kernel and shape is a probe on synthetic inputs of the real shapes, evaluated on the spot.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import mlx.core as mx

MODE_ENV = "MLX_QWEN36_KERNELS"
CONSTANT_SPACE_BELOW = 8  # inputs with fewer elements reach a kernel as `const constant T*`, others `const device`
CHOICES_PATH = Path.home() / ".cache" / "mlx_qwen36" / "kernel_choices.json"
log = logging.getLogger("mlx_qwen36.kernels")

_failed: dict[str, str] = {}  # kernel name -> why it was turned off
_choices: dict[str, bool] = {}  # "device|op|key" -> use the kernel
_recording: list[bool] = []  # inside `recording(kernels_on)`: its flag
_forced: list[str] = []  # inside `forced(mode)`: that mode


def mode() -> str:
    """`off`, `on` or `auto`, from MLX_QWEN36_KERNELS (read on every call, so tests and users can switch it)."""
    if _forced:
        return _forced[-1]
    value = os.environ.get(MODE_ENV, "auto").strip().lower()
    if value in ("0", "off", "false"):
        return "off"
    if value in ("1", "on", "true"):
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{MODE_ENV}={value!r}: expected 0, 1 or auto")


def on_metal() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def backend() -> str | None:
    """Where custom kernels run now: `metal`, `emulator` (forced on, no Metal), `record` (see `recording`), or None
    (the references)."""
    if _recording:
        return "record" if _recording[-1] else None
    m = mode()
    if m == "off":
        return None
    if on_metal():
        return "metal"
    return "emulator" if m == "on" else None


@contextmanager
def recording(kernels_on: bool = True) -> Iterator[None]:
    """Build the graph a Mac would run, to count it (`mlx_qwen36.graph`), on any machine: every kernel as the real
    `mx.fast.metal_kernel` call, not run nor probed (inside `mx.export_function` even a machine without Metal records
    each launch as one `CustomKernel` node), or with `kernels_on=False` the references; and the ops' Metal forms
    instead of the CPU's (`metal_graph`)."""
    _recording.append(kernels_on)
    try:
        yield
    finally:
        _recording.pop()


@contextmanager
def forced(kernels_mode: str) -> Iterator[None]:
    """Run with kernels `on` or `off` whatever MLX_QWEN36_KERNELS says (the kernel check compares the two)."""
    if kernels_mode not in ("on", "off"):
        raise ValueError(f"kernels mode {kernels_mode!r}: expected 'on' or 'off'")
    _forced.append(kernels_mode)
    try:
        yield
    finally:
        _forced.pop()


def metal_graph() -> bool:
    """Whether the ops build their Metal forms: on a Metal GPU, and while `recording` a Mac's graph elsewhere."""
    return bool(_recording) or on_metal()


@cache
def absent(dtype: mx.Dtype) -> mx.array:
    """The stand-in passed for an input a kernel instantiation does not read. It has the dtype the kernel declares
    for that buffer, and 8 elements: MLX passes an input of fewer in the `constant` address space, and a kernel
    that selects among its inputs into one `const device` pointer (qmv's layers, the shared expert's weights) would
    not compile on Metal. Evaluated once, so no traced or compiled step recomputes it."""
    a = mx.zeros((CONSTANT_SPACE_BELOW,), dtype=dtype)
    mx.eval(a)
    return a


def emulated() -> bool:
    """Whether kernels run in the CPU emulator, which evaluates its inputs eagerly (so it cannot be traced)."""
    return backend() == "emulator"


@cache
def source(filename: str) -> str:
    """A kernel source shipped in the `mlx_qwen36.metal` package."""
    return resources.files("mlx_qwen36.metal").joinpath(filename).read_text()


class Kernel:
    """One Metal kernel: its body from `<name>.metal`, the shared helpers of `common.h` as its header, and the
    callable of the current back end (`mx.fast.metal_kernel`, or the emulator's twin), made on first use."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str]):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self._made: dict[str, Any] = {}

    def spec(self) -> dict[str, Any]:
        """The keyword arguments of `mx.fast.metal_kernel` for this kernel."""
        return {"name": self.name, "input_names": self.input_names, "output_names": self.output_names,
                "source": source(f"{self.name}.metal"), "header": source("common.h")}

    def _callable(self) -> Any:
        where = "metal" if backend() in (None, "record") else backend()
        if where not in self._made:
            if where == "emulator":
                from ..metal.emulator import EmuKernel

                self._made[where] = EmuKernel(**self.spec())
            else:
                self._made[where] = mx.fast.metal_kernel(**self.spec())
        return self._made[where]

    def __call__(self, inputs: list, output_shapes: list, output_dtypes: list, grid: tuple[int, int, int],
                 threadgroup: tuple[int, int, int], template: list[tuple[str, Any]]) -> list[mx.array]:
        return self._callable()(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
                                threadgroup=threadgroup, template=template)


def failed(kernel: str) -> str | None:
    """Why `kernel` was turned off in this process, or None."""
    return _failed.get(kernel)


def report_failure(kernel: str, error: BaseException) -> None:
    """Turn `kernel` off for this process and say so once."""
    if kernel in _failed:
        return
    _failed[kernel] = f"{type(error).__name__}: {error}"
    message = f"mlx_qwen36: the `{kernel}` kernel failed and is turned off; its op uses the reference ({error})"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset() -> None:
    """Forget failures and timed choices of this process (tests; a user after changing MLX versions)."""
    _failed.clear()
    _choices.clear()


def device_name() -> str:
    if on_metal():
        return str(mx.metal.device_info().get("device_name", "metal"))
    return str(mx.default_device())


def dispatch(kernel: str, key: tuple, run_kernel: Callable[..., Any], run_reference: Callable[..., Any],
             args: tuple) -> Any:
    """`run_kernel(*args)` where the kernel is on for this shape, else `run_reference(*args)`.

    `key` identifies what the kernel's speed depends on (shapes, dtypes, quantization); the first call with a new key
    on Metal probes the kernel on synthetic inputs shaped like `args` and, in `auto` mode, times it against the
    reference there. In the emulator the kernel always runs (that is what it is for); a failure at launch turns it
    off like a failed probe.
    """
    where = backend()
    if where is None or kernel in _failed:
        return run_reference(*args)
    if where == "record":
        return run_kernel(*args)
    if where == "emulator":
        try:
            return run_kernel(*args)
        except (RuntimeError, ValueError, OSError) as error:
            report_failure(kernel, error)
            return run_reference(*args)
    if not _chosen(kernel, key, run_kernel, run_reference, args):
        return run_reference(*args)
    return run_kernel(*args)


def _choice_key(kernel: str, key: tuple) -> str:
    return f"{device_name()}|mlx {mx.__version__}|{kernel}|{key!r}"


def _chosen(kernel: str, key: tuple, run_kernel: Callable, run_reference: Callable, args: tuple) -> bool:
    name = _choice_key(kernel, key)
    if name in _choices:
        return _choices[name]
    probe = tuple(synthetic(a) for a in args)
    try:
        mx.eval(run_kernel(*probe))
    except Exception as error:  # a Metal compile or launch error surfaces here, at evaluation
        report_failure(kernel, error)
        return False
    if mode() == "on":
        choice = True
    else:
        remembered = _load_choices().get(name)
        choice = remembered if remembered is not None else measure(run_kernel, probe) < measure(run_reference, probe)
    _choices[name] = choice
    _save_choice(name, choice)
    return choice


def synthetic(a: Any) -> Any:
    """An input like `a` for a probe: random floats in [-1, 1], zero integers (valid indices), other values as they are.
    Fresh arrays, so a probe can run while `a` itself is a tracer inside `mx.compile`."""
    if not isinstance(a, mx.array):
        return a
    if mx.issubdtype(a.dtype, mx.floating):
        return mx.random.uniform(-1, 1, a.shape).astype(a.dtype)
    return mx.zeros(a.shape, a.dtype)


def measure(fn: Callable[..., Any], args: tuple, repeats: int = 10) -> float:
    """Seconds per call of fn(*args), the best of `repeats` after a warm-up."""
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _load_choices() -> dict[str, bool]:
    try:
        data = json.loads(CHOICES_PATH.read_text())
    except (OSError, ValueError):
        return {}
    return {k: bool(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_choice(name: str, choice: bool) -> None:
    """Remember a timed choice across runs (best effort: a read-only home only costs a re-measure next time)."""
    if mode() == "on":
        return
    try:
        data = _load_choices()
        data[name] = choice
        CHOICES_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = CHOICES_PATH.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, CHOICES_PATH)
    except OSError:
        pass
