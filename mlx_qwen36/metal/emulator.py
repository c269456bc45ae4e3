"""A CPU emulator for `mx.fast.metal_kernel`: runs the exact Metal source MLX would compile, on the CPU.

Metal cannot execute on Linux, so the project's custom kernels would otherwise go untested there. `EmuKernel`
takes the same arguments as `mx.fast.metal_kernel` and its call the same keywords as the real kernel's call. It
generates the kernel text exactly as MLX 0.32.4 does (`metal_source`; checked byte for byte against MLX's own text,
which `mlx_generated_source` reads out of an `mx.export_function` file), turns it into C++20 with a small shim
(`msl_shim.h`), compiles it once with g++ into a cache and runs it: every GPU thread is a fiber, SIMD collectives
run in lockstep (all live lanes of a 32-lane SIMD-group must reach the same call site), barriers wait for every
live thread of the threadgroup. See the shim's header comment and ../../shared/spec/KERNELS.md, section 2.

Semantics reproduced from MLX (mlx/backend/common/metal_kernel.cpp, mlx/backend/metal/custom_kernel.cpp):

* `grid` is the total number of threads per dimension (dispatchThreads); the threadgroup is clamped to
  `min(threadgroup, grid)` per dimension; edge threadgroups are partial and threads outside the grid are not
  launched. A threadgroup of more than 1024 threads (unclamped product, as MLX checks it) raises ValueError.
* Python ints become int32 scalars, floats float32, bools bool; a 0-d input is passed by reference, an input of
  fewer than 8 elements in the `constant` address space (which only changes the text).
* `ensure_row_contiguous=True` copies non-row-contiguous inputs first. With False the kernel gets the array's real
  memory and strides (`x_strides`, in elements; broadcast and negative strides included).
* Outputs start as NaN (integer and bool outputs as 0xAB bytes) unless `init_value` is given, so that unwritten
  elements show. Threadgroup memory starts as 0xFF bytes (NaN) in every threadgroup.
* A SIMD shuffle/broadcast that reads a lane which does not take part (it has returned, or lies beyond a partial
  SIMD-group) gets NaN for floating-point data and 0 otherwise. `simd_shuffle_down`/`_up` leave the lanes whose
  source lies outside the SIMD-group unchanged. Reductions are an ascending butterfly (xor 1, 2, 4, 8, 16), which is
  what mlx-lm documents for Apple GPUs; results are not bitwise those of a GPU in general.
* `threads_per_threadgroup` and `simdgroups_per_threadgroup` describe the actual (possibly partial) threadgroup,
  the `dispatch_*` attributes the requested one; `thread_index_in_threadgroup` is linear in the actual size.

Errors: g++ failures raise `KernelCompileError` (kernel name and the compiler's first lines); a divergent SIMD
collective (lanes of one SIMD-group waiting at different collectives, or at a collective and a barrier) or threads
at different barriers raise `KernelRuntimeError` naming the kernel and the sites (`<name>.metal:line:column`: lines
of the generated kernel text, which `metal_source` returns and `verbose=True` prints; compile errors cite the same).
A crash of the kernel itself (a wild pointer, a fiber stack overflow into its guard page) takes the process down, as
there is no isolation.

Environment: MLX_QWEN36_EMULATOR_CACHE (the .so cache, default ~/.cache/mlx_qwen36/emulator),
MLX_QWEN36_EMULATOR_THREADS (OS threads per launch, default 2), MLX_QWEN36_EMULATOR_STACK_KIB (fiber stack, 64),
MLX_QWEN36_EMULATOR_UCONTEXT=1 (use ucontext instead of the x86-64 context switch; always used elsewhere),
MLX_QWEN36_EMULATOR_PCH=0 (do not precompile the shim), MLX_QWEN36_CXX (the compiler, default g++).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

__all__ = [
    "EmuKernel",
    "KernelCompileError",
    "KernelRuntimeError",
    "metal_source",
    "mlx_generated_source",
]

SHIM_PATH = Path(__file__).with_name("msl_shim.h")
MAX_THREADS_PER_THREADGROUP = 1024
_MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes inputs with fewer elements in the constant address space

# The thread attributes MLX adds to the signature when their name occurs in the source, in MLX's order.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


class KernelCompileError(RuntimeError):
    """g++ could not compile the kernel (the message names the kernel and quotes the compiler's first errors)."""


class KernelRuntimeError(RuntimeError):
    """The kernel ran into something the emulator cannot schedule: a divergent SIMD collective, threads at
    different barriers. The message names the kernel and the sites."""


# mx dtype -> (Metal type string as MLX's get_type_string writes it, numpy storage dtype, is floating-point)
_DTYPES = {
    mx.bool_: ("bool", np.bool_, False),
    mx.uint8: ("uint8_t", np.uint8, False),
    mx.uint16: ("uint16_t", np.uint16, False),
    mx.uint32: ("uint32_t", np.uint32, False),
    mx.uint64: ("uint64_t", np.uint64, False),
    mx.int8: ("int8_t", np.int8, False),
    mx.int16: ("int16_t", np.int16, False),
    mx.int32: ("int32_t", np.int32, False),
    mx.int64: ("int64_t", np.int64, False),
    mx.float16: ("float16_t", np.float16, True),
    mx.bfloat16: ("bfloat16_t", np.uint16, True),
    mx.float32: ("float", np.float32, True),
    mx.float64: ("double", np.float64, True),
    mx.complex64: ("complex64_t", np.complex64, True),
}
_NAN_BITS = {mx.bfloat16: 0x7FC0}


def _type_string(dtype) -> str:
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        raise ValueError(f"Unsupported compilation type {dtype}") from None


def _as_array(x) -> mx.array:
    """An input as MLX's `to_array` makes it: Python bool -> bool, int -> int32, float -> float32 scalars."""
    if isinstance(x, mx.array):
        return x
    if isinstance(x, bool):
        return mx.array(x, dtype=mx.bool_)
    if isinstance(x, int):
        return mx.array(x, dtype=mx.int32)
    if isinstance(x, float):
        return mx.array(x, dtype=mx.float32)
    return mx.array(x)


def _template_args(template) -> list[tuple[str, str, object]]:
    """[(name, kind, value)], kind 'int' | 'bool' | 'typename' (value: the Metal type string)."""
    out = []
    for name, value in template or []:
        if isinstance(value, bool):
            out.append((name, "bool", bool(value)))
        elif isinstance(value, int):
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"[metal_kernel] Template argument {name}={value} does not fit an int.")
            out.append((name, "int", int(value)))
        elif isinstance(value, mx.Dtype):
            out.append((name, "typename", _type_string(value)))
        else:
            raise ValueError("[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`.")
    return out


def _write_template(targs) -> str:
    parts = []
    for _, kind, value in targs:
        if kind == "bool":
            parts.append("1" if value else "0")
        else:
            parts.append(str(value))
    return "<" + ", ".join(parts) + ">"


def _make_template_hash(template_def: str) -> str:
    out = []
    i = 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>":
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


@dataclass(frozen=True)
class _InputDesc:
    dtype: object
    ndim: int
    size: int


@dataclass
class _Generated:
    kernel_name: str
    text: str  # the full kernel text, as MLX generates it
    template_def: str  # "<float, 3, 1>" or ""
    params: list  # signature order: ("in", i) ("shape", i) ("strides", i) ("ndim", i) ("out", j) ("attr", name)
    param_types: list  # C++ parameter types, without address spaces (for the launcher's casts)


def _describe(x) -> _InputDesc:
    a = _as_array(x)
    return _InputDesc(a.dtype, a.ndim, a.size)


def _generate(name, input_names, output_names, source, header, descs, output_dtypes, template, atomic_outputs):
    """A Python port of metal_kernel's name mangling and `write_signature` (MLX 0.32.4), including its quirks."""
    input_names = list(input_names)
    output_names = list(output_names)
    targs = _template_args(template)
    shape_infos = [
        (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names
    ]
    attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]

    kernel_name = "custom_kernel_" + name
    template_def = ""
    if targs:
        template_def = _write_template(targs)
        kernel_name += "_" + _make_template_hash(template_def)
    for d in descs:
        kernel_name += "_" + _type_string(d.dtype)
        if d.ndim == 0:
            kernel_name += "s"
        elif d.size < _MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dt in output_dtypes:
        kernel_name += "_" + _type_string(dt)

    s = [header]
    if targs:
        s.append("template <" + ", ".join(f"{kind} {n}" for n, kind, _ in targs) + ">\n")
    s.append(f"[[kernel]] void {kernel_name}(\n")
    params, ptypes = [], []
    index = 0
    for i, (n, d) in enumerate(zip(input_names, descs)):
        t = _type_string(d.dtype)
        location = "constant" if d.size < _MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if d.ndim == 0 else "*"
        s.append(f"  const {location} {t}{ref} {n} [[buffer({index})]],\n")
        params.append(("in", i))
        ptypes.append(f"const {t}{ref}")
        index += 1
        if d.ndim > 0:
            if shape_infos[i][0]:
                s.append(f"  const constant int* {n}_shape [[buffer({index})]],\n")
                params.append(("shape", i))
                ptypes.append("const int*")
                index += 1
            if shape_infos[i][1]:
                s.append(f"  const constant int64_t* {n}_strides [[buffer({index})]],\n")
                params.append(("strides", i))
                ptypes.append("const int64_t*")
                index += 1
            if shape_infos[i][2]:
                s.append(f"  const constant int& {n}_ndim [[buffer({index})]],\n")
                params.append(("ndim", i))
                ptypes.append("const int&")
                index += 1
    for j, (n, dt) in enumerate(zip(output_names, output_dtypes)):
        t = _type_string(dt)
        full = f"atomic<{t}>" if atomic_outputs else t
        s.append(f"  device {full}* {n} [[buffer({index})]]")
        # MLX compares the buffer index (which counts the shape/strides/ndim buffers too) with
        # inputs + outputs - 1: reproduced as is.
        if index < len(descs) + len(output_names) - 1 or attributes:
            s.append(",\n")
        else:
            s.append(") {\n")
        params.append(("out", j))
        ptypes.append(f"metal::atomic<{t}>*" if atomic_outputs else f"{t}*")
        index += 1
    for k, (a, t) in enumerate(attributes):
        s.append(f"  {t} {a} [[{a}]]")
        s.append(",\n" if k < len(attributes) - 1 else ") {\n")
        params.append(("attr", a))
        ptypes.append(t)
    s.append(source)
    s.append("\n}\n")
    if targs:
        full_def = kernel_name + template_def
        s.append(f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({full_def}) {full_def};\n')
    return _Generated(kernel_name, "".join(s), template_def, params, ptypes)


def metal_source(
    name, input_names, output_names, source, header, inputs, output_dtypes, template, atomic_outputs=False
) -> str:
    """The full kernel text MLX generates for this call (header + template + signature + body + instantiation),
    without MLX's prepended utils."""
    descs = [_describe(x) for x in inputs]
    return _generate(
        name, input_names, output_names, source, header, descs, list(output_dtypes), template, atomic_outputs
    ).text


def _parse_mlxfn(data: bytes) -> str:
    tag = struct.pack("<Q", len(b"CustomKernel")) + b"CustomKernel"
    i = data.find(tag)
    if i < 0:
        raise RuntimeError("no CustomKernel primitive in the exported function")
    i += len(tag)
    strings = []
    for _ in range(2):
        (n,) = struct.unpack_from("<Q", data, i)
        strings.append(data[i + 8 : i + 8 + n].decode())
        i += 8 + n
    kernel_name, source = strings
    if not kernel_name.startswith("custom_kernel_") or kernel_name not in source:
        raise RuntimeError("unexpected .mlxfn layout: cannot read the CustomKernel source")
    return source


def mlx_generated_source(kernel_kwargs: dict, call_kwargs: dict) -> str:
    """MLX's own generated text for the same kernel and call.

    Works without Metal: inside `mx.export_function` the call is recorded instead of raising, and the .mlxfn file
    holds the CustomKernel primitive with its source (KERNELS.md, section 1).
    """
    kernel = mx.fast.metal_kernel(**kernel_kwargs)
    call = {k: v for k, v in call_kwargs.items() if k not in ("stream", "verbose")}
    inputs = list(call.pop("inputs"))
    positions = [i for i, x in enumerate(inputs) if isinstance(x, mx.array)]

    def fn(*arrays):
        ins = list(inputs)
        for p, a in zip(positions, arrays):
            ins[p] = a
        return kernel(inputs=ins, **call)

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.mlxfn")
        mx.export_function(path, fn, *[inputs[p] for p in positions])
        data = Path(path).read_bytes()
    return _parse_mlxfn(data)


# ---------------------------------------------------------------------------------------------------------------
# Metal text -> C++
# ---------------------------------------------------------------------------------------------------------------

_ATTR_RE = re.compile(r"\[\[.*?\]\]", re.S)
_METAL_INCLUDE_RE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>[^\n]*$", re.M)
_THREADGROUP_RE = re.compile(r"\bthreadgroup\b")
_DECLARATOR_NAME_RE = re.compile(r"(\w+)\s*(?:\[|$)")


def _strip_brackets(s: str) -> str:
    out, depth = [], 0
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "<[(":
            depth += 1
        elif ch in ">])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _declaration_end(text: str, i: int) -> int:
    """The index of the first of ; ( ) { } = after i outside [...] (array bounds may hold anything)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif depth == 0 and c in ";(){}=":
            return i
        i += 1
    return i


def _rewrite_threadgroup(text: str) -> str:
    """`threadgroup T x[N];` (storage) -> `static thread_local T x[N];` plus a call that refreshes it per
    threadgroup; every other `threadgroup` (a qualifier on pointers, references, casts) -> nothing."""
    out, pos = [], 0
    for m in _THREADGROUP_RE.finditer(text):
        out.append(text[pos : m.start()])
        pos = m.end()
        end = _declaration_end(text, m.end())
        decl = text[m.end() : end]
        if end < len(text) and text[end] == ";" and not re.search(r"[*&]", _strip_brackets(decl)):
            names = []
            for part in _split_top_level(decl):
                nm = _DECLARATOR_NAME_RE.search(_strip_brackets_keep_marker(part))
                if nm:
                    names.append(nm.group(1))
            fresh = "".join(f" ::emu::tg_fresh(&{n}, sizeof({n}));" for n in names)
            out.append("static thread_local" + decl + ";" + fresh)
            pos = end + 1
        # else: a qualifier, dropped
    out.append(text[pos:])
    return "".join(out)


def _strip_brackets_keep_marker(s: str) -> str:
    """'float a[4][2]' -> 'float a['  (so that the declarator name is the word before the first '[')."""
    i = s.find("[")
    return s if i < 0 else s[: i + 1]


def _strip_comments(text: str) -> str:
    """Comments -> nothing (newlines kept, so line numbers stay); string and character literals are respected."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(" " + "\n" * text.count("\n", i, j))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _strip_attributes(text: str) -> str:
    return _ATTR_RE.sub(lambda m: "\n" * m.group().count("\n"), text)


def _to_cpp(gen: _Generated, name: str) -> str:
    body = _strip_comments(gen.text)
    body = _METAL_INCLUDE_RE.sub("", body)
    body = _strip_attributes(body)
    body = _rewrite_threadgroup(body)
    args = []
    k = 0
    for (kind, what), t in zip(gen.params, gen.param_types):
        if kind == "attr":
            args.append(f"a.{what}")
            continue
        if t.endswith("&"):
            args.append(f"*({t[:-1]}*)b[{k}]")
        else:
            args.append(f"({t})b[{k}]")
        k += 1
    fn = gen.kernel_name + gen.template_def
    call = f"{fn}(\n      " + ",\n      ".join(args) + ")"
    return (
        '#include "msl_shim.h"\n'
        f'#line 1 "{_safe_name(name)}.metal"\n'
        f"{body}\n"
        '#line 1 "emulator_launcher.cpp"\n'
        "namespace {\n"
        "void emu_entry(void* const* b, const emu::Attrs& a) {\n"
        "  (void)b;\n  (void)a;\n"
        f"  {call};\n"
        "}\n"
        "}  // namespace\n"
        'extern "C" __attribute__((visibility("default"))) int emu_launch(\n'
        "    void* const* bufs, const uint32_t* dims, int nworkers, size_t stack, char* err, size_t errlen) {\n"
        "  return emu::run_grid(&emu_entry, bufs, dims, nworkers, stack, err, errlen);\n"
        "}\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Compilation and cache
# ---------------------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}  # content hash -> launcher
_BY_TEXT: dict[tuple, object] = {}  # (kernel text, name, compiler, flags, cache) -> launcher
_COMPILER_ID: dict[str, str] = {}


def _cache_dir() -> Path:
    d = os.environ.get("MLX_QWEN36_EMULATOR_CACHE")
    p = Path(d) if d else Path.home() / ".cache" / "mlx_qwen36" / "emulator"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _compiler() -> str:
    return os.environ.get("MLX_QWEN36_CXX", "g++")


def _compiler_id(cxx: str) -> str:
    if cxx not in _COMPILER_ID:
        try:
            r = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
            _COMPILER_ID[cxx] = r.stdout.splitlines()[0] if r.stdout else cxx
        except OSError as e:
            raise KernelCompileError(f"the C++ compiler {cxx!r} cannot be run: {e}") from e
    return _COMPILER_ID[cxx]


def _flags() -> list[str]:
    flags = [
        "-std=c++20",
        "-O2",
        "-fPIC",
        "-shared",
        "-pthread",
        "-fvisibility=hidden",
        "-fno-strict-aliasing",  # kernels reinterpret device memory freely (uint32 -> uint8/uint16 ...)
        "-fwrapv",  # GPU integer arithmetic wraps
        "-ffp-contract=off",
        "-fstack-clash-protection",  # large frames probe every page, so a fiber stack overflow hits its guard page
        "-w",
    ]
    if os.uname().machine in ("x86_64", "AMD64"):
        flags.append("-fcf-protection=none")  # the fiber switch returns into fresh stacks
    if os.environ.get("MLX_QWEN36_EMULATOR_UCONTEXT") == "1":
        flags.append("-DEMU_USE_UCONTEXT")
    return flags


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s)[:80]


_PCH: dict[str, Path | None] = {}


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}")
    tmp.write_text(data)
    os.replace(tmp, path)


def _include_dir(cxx: str, flags: list[str], shim: str) -> Path:
    """Where the kernels find msl_shim.h: a cache folder with a copy of it and its precompiled form (saves about
    40 % of each build), or the package folder when precompiling fails or MLX_QWEN36_EMULATOR_PCH=0."""
    if os.environ.get("MLX_QWEN36_EMULATOR_PCH") == "0":
        return SHIM_PATH.parent
    key = hashlib.sha256("\0".join([shim, " ".join(flags), _compiler_id(cxx)]).encode()).hexdigest()[:24]
    with _LOCK:
        if key in _PCH:
            return _PCH[key] or SHIM_PATH.parent
    d = _cache_dir() / f"pch-{key}"
    gch = d / "msl_shim.h.gch"
    ok = gch.exists()
    if not ok:
        d.mkdir(exist_ok=True)
        _atomic_write(d / "msl_shim.h", shim)
        tmp = d / f"msl_shim.h.gch.tmp-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
        header_flags = [f for f in flags if f != "-shared"]
        r = subprocess.run([cxx, *header_flags, "-x", "c++-header", str(d / "msl_shim.h"), "-o", str(tmp)],
                           capture_output=True, text=True, check=False)
        ok = r.returncode == 0
        if ok:
            os.replace(tmp, gch)
        else:
            tmp.unlink(missing_ok=True)
    with _LOCK:
        _PCH[key] = d if ok else None
    return d if ok else SHIM_PATH.parent


def _first_errors(output: str, n: int = 20) -> str:
    """The compiler's first `n` lines, without the include chain, each cut at 300 characters; the first error lines
    are added when those lines hold none."""
    lines = [ln for ln in output.splitlines() if not re.match(r"\s*(In file included from|from )", ln)]
    head = lines[:n]
    if not any("error" in ln for ln in head):
        head += [ln for ln in lines if "error" in ln][:5]
    return "\n".join(ln if len(ln) <= 300 else ln[:300] + " ..." for ln in head)


def _load(gen: _Generated, name: str):
    cxx = _compiler()
    flags = _flags()
    fast_key = (gen.text, name, cxx, tuple(flags), os.environ.get("MLX_QWEN36_EMULATOR_CACHE"))
    with _LOCK:
        fn = _BY_TEXT.get(fast_key)
    if fn is not None:
        return fn
    fn = _build(gen, name, cxx, flags)
    with _LOCK:
        _BY_TEXT[fast_key] = fn
    return fn


def _build(gen: _Generated, name: str, cxx: str, flags: list[str]):
    cpp = _to_cpp(gen, name)
    shim = SHIM_PATH.read_text()
    key = hashlib.sha256("\0".join([cpp, shim, " ".join(flags), _compiler_id(cxx)]).encode()).hexdigest()[:24]
    with _LOCK:
        fn = _LOADED.get(key)
    if fn is not None:
        return fn
    cache = _cache_dir()
    so = cache / f"{_safe_name(gen.kernel_name)}-{key}.so"
    if not so.exists():
        src = cache / f"{_safe_name(gen.kernel_name)}-{key}.cpp"
        tag = f".tmp-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
        tmp_src = src.with_name(src.name + tag + ".cpp")
        tmp_so = so.with_name(so.name + tag + ".so")
        tmp_src.write_text(cpp)
        try:
            r = subprocess.run(
                [cxx, *flags, "-I", str(_include_dir(cxx, flags, shim)), "-o", str(tmp_so), str(tmp_src)],
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode != 0:
                first = _first_errors(r.stderr or r.stdout)
                failed = cache / f"failed-{_safe_name(gen.kernel_name)}-{key}.cpp"
                os.replace(tmp_src, failed)
                raise KernelCompileError(
                    f"kernel '{name}' ({gen.kernel_name}) does not compile (g++ exit {r.returncode}; source kept in "
                    f"{failed}):\n{first}"
                )
            os.replace(tmp_src, src)
            os.replace(tmp_so, so)
        finally:
            for p in (tmp_src, tmp_so):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
    lib = ctypes.CDLL(str(so))
    fn = lib.emu_launch
    fn.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_int,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    fn.restype = ctypes.c_int
    fn._emu_lib = lib  # keep the library loaded
    with _LOCK:
        _LOADED[key] = fn
    return fn


# ---------------------------------------------------------------------------------------------------------------
# Host buffers
# ---------------------------------------------------------------------------------------------------------------


def _host_view(a: mx.array, row_contiguous: bool) -> np.ndarray:
    """A numpy view of an evaluated array's memory (bfloat16 as uint16), copied only if row contiguity is required
    and missing."""
    v = np.asarray(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.asarray(a)
    if row_contiguous and not v.flags.c_contiguous:
        v = np.ascontiguousarray(v)
    return v


def _new_output(shape, dtype, init_value) -> np.ndarray:
    _, storage, is_float = _DTYPES[dtype]
    out = np.empty(tuple(int(s) for s in shape), dtype=storage)
    if init_value is None:
        if dtype in _NAN_BITS:
            out.fill(_NAN_BITS[dtype])
        elif is_float:
            out.fill(np.nan)
        else:
            out.view(np.uint8).fill(0xAB)
    elif dtype == mx.bfloat16:
        out.fill(int(np.asarray(mx.array(float(init_value), dtype=mx.bfloat16).view(mx.uint16))))
    else:
        out.fill(np.array(init_value, dtype=np.float32).astype(storage))
    return out


def _to_mx(buf: np.ndarray, dtype) -> mx.array:
    a = mx.array(buf)
    return a.view(mx.bfloat16) if dtype == mx.bfloat16 else a


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


class EmuKernel:
    """Drop-in for `mx.fast.metal_kernel(...)`: the same constructor arguments, the same call keywords."""

    def __init__(
        self,
        name: str,
        input_names: list[str],
        output_names: list[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: dict | None = None,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.compile_options = compile_options  # accepted for compatibility; math modes are not emulated

    def __call__(
        self,
        *,
        inputs: list,
        output_shapes: list,
        output_dtypes: list,
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: list[tuple[str, object]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream=None,
    ) -> list[mx.array]:
        for got, want, what in (
            (len(inputs), len(self.input_names), "inputs"),
            (len(output_shapes), len(self.output_names), "output_shapes"),
            (len(output_dtypes), len(self.output_names), "output_dtypes"),
        ):
            if got != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} but got size {got}.")
        arrays = [_as_array(x) for x in inputs]
        output_dtypes = list(output_dtypes)
        descs = [_InputDesc(a.dtype, a.ndim, a.size) for a in arrays]
        gen = _generate(
            self.name,
            self.input_names,
            self.output_names,
            self.source,
            self.header,
            descs,
            output_dtypes,
            template,
            self.atomic_outputs,
        )
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.text}\n```")

        grid = tuple(int(g) for g in grid)
        tg = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg) != 3:
            raise ValueError("[metal_kernel] grid and threadgroup must have 3 dimensions.")
        if any(g < 0 for g in grid) or any(t < 1 for t in tg):
            raise ValueError(f"[metal_kernel] Invalid grid {grid} or threadgroup {tg}.")
        tg_size = tg[0] * tg[1] * tg[2]
        if tg_size > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"Thread group size ({tg_size}) is greater than  the maximum allowed threads per threadgroup "
                f"({MAX_THREADS_PER_THREADGROUP})."
            )
        clamped = tuple(min(t, g) for t, g in zip(tg, grid))

        fn = _load(gen, self.name)

        mx.eval(*arrays)
        views = [_host_view(a, self.ensure_row_contiguous) for a in arrays]
        outs = [_new_output(s, dt, init_value) for s, dt in zip(output_shapes, output_dtypes)]
        keep: list[np.ndarray] = []
        ptrs: list[int] = []
        for kind, what in gen.params:
            if kind == "attr":
                continue
            if kind == "in":
                buf = views[what]
            elif kind == "out":
                buf = outs[what]
            else:
                v = views[what]
                if kind == "shape":
                    buf = np.array(v.shape, dtype=np.int32)
                elif kind == "strides":
                    buf = np.array([s // v.itemsize for s in v.strides], dtype=np.int64)
                else:
                    buf = np.array([v.ndim], dtype=np.int32)
            keep.append(buf)
            ptrs.append(buf.ctypes.data)
        bufs = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        dims = (ctypes.c_uint32 * 6)(*grid, *clamped)
        err = ctypes.create_string_buffer(4096)
        rc = fn(
            bufs,
            dims,
            _env_int("MLX_QWEN36_EMULATOR_THREADS", 2),
            _env_int("MLX_QWEN36_EMULATOR_STACK_KIB", 64) * 1024,
            err,
            len(err),
        )
        del keep
        if rc != 0:
            raise KernelRuntimeError(f"kernel '{self.name}' ({gen.kernel_name}): {err.value.decode(errors='replace')}")
        return [_to_mx(o, dt) for o, dt in zip(outs, output_dtypes)]
