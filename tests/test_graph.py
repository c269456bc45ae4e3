"""mlx_qwen36.graph: the nodes, shapes, dtypes and counts of traced graphs, read through an export callback and
through an .mlxfn file (the two must agree), on small functions, a custom Metal kernel, a closed-over constant and
an mlx-lm Qwen3.5-MoE decode step."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_qwen36 import graph
from mlx_qwen36.graph import GraphError, Node

F32 = "float32"


def both(fn, *args):
    """The callback trace, checked equal to the .mlxfn trace."""
    nodes = graph.trace(fn, *args)
    assert graph.trace_file(fn, *args) == nodes
    return nodes


def test_matmul_add_softmax_exactly():
    x, w, b = mx.ones((4, 64)), mx.ones((64, 32)), mx.ones((32,))
    nodes = both(lambda x, w, b: mx.softmax(x @ w + b, axis=-1), x, w, b)
    assert nodes == [
        Node("Matmul", None, (((4, 64), F32), ((64, 32), F32)), (((4, 32), F32),)),
        Node("Broadcast", None, (((32,), F32),), (((4, 32), F32),)),
        Node("Add", None, (((4, 32), F32), ((4, 32), F32)), (((4, 32), F32),)),
        Node("Softmax", None, (((4, 32), F32),), (((4, 32), F32),)),
    ]
    assert graph.dispatches(nodes) == 3
    assert graph.by_primitive(nodes) == {"Add": 1, "Matmul": 1, "Softmax": 1}
    matmul = (4 * 64 + 64 * 32 + 4 * 32) * 4
    add = 3 * 4 * 32 * 4  # the broadcast bias is read at its broadcast shape
    softmax = 2 * 4 * 32 * 4
    assert graph.bytes_moved(nodes) == matmul + add + softmax


def test_multi_output_primitive_once_with_both_outputs():
    x, y = mx.ones((8, 3)), mx.full((8, 3), 2.0)
    nodes = both(lambda x, y: mx.divmod(x, y), x, y)
    assert nodes == [Node("DivMod", None, (((8, 3), F32),) * 2, (((8, 3), F32),) * 2)]
    assert graph.dispatches(nodes) == 1
    assert graph.bytes_moved(nodes) == 4 * 8 * 3 * 4


def test_quantized_matmul_inputs_counted_exactly():
    wq, scales, biases = mx.quantize(mx.random.normal((64, 128)), group_size=32, bits=4)
    mx.eval(wq, scales, biases)
    assert (wq.dtype, wq.shape, scales.shape, biases.shape) == (mx.uint32, (64, 16), (64, 4), (64, 4))
    x = mx.ones((1, 128), dtype=mx.float16)
    scales16, biases16 = scales.astype(mx.float16), biases.astype(mx.float16)
    mx.eval(scales16, biases16)

    def f(x):  # weights closed over: they are constants of the export
        return mx.quantized_matmul(x, wq, scales16, biases16, transpose=True, group_size=32, bits=4)

    nodes = both(f, x)
    assert nodes == [Node("QuantizedMatmul", None,
                          (((1, 128), "float16"), ((64, 16), "uint32"), ((64, 4), "float16"), ((64, 4), "float16")),
                          (((1, 64), "float16"),))]
    assert graph.bytes_moved(nodes) == 128 * 2 + 64 * 16 * 4 + 2 * 64 * 4 * 2 + 64 * 2


def test_custom_metal_kernel_recorded_with_its_name():
    kernel = mx.fast.metal_kernel(
        name="graph_test_pair", input_names=["a"], output_names=["lo", "hi"],
        source="uint e = thread_position_in_grid.x; lo[e] = a[e]; hi[e] = static_cast<half>(a[e]);")
    with pytest.raises(RuntimeError, match="No Metal back-end"):  # outside an export it cannot run here
        kernel(inputs=[mx.ones((16,))], grid=(16, 1, 1), threadgroup=(16, 1, 1), output_shapes=[(16,), (16,)],
               output_dtypes=[mx.float32, mx.float16])

    def f(x):
        lo, hi = kernel(inputs=[x * 2], grid=(16, 1, 1), threadgroup=(16, 1, 1), output_shapes=[(16,), (4, 4)],
                        output_dtypes=[mx.float32, mx.float16])
        return lo + 1, hi

    nodes = both(f, mx.ones((16,)))
    kernels = [n for n in nodes if n.primitive == "CustomKernel"]
    assert len(kernels) == 1
    k = kernels[0]
    assert k.name.startswith("custom_kernel_graph_test_pair")
    assert k.inputs == (((16,), F32),) and k.outputs == (((16,), F32), ((4, 4), "float16"))
    counts = graph.by_primitive(nodes)
    assert counts == {k.name: 1, "Add": 1, "Multiply": 1}
    assert graph.dispatches(nodes) == 3


def test_closed_over_large_constant(tmp_path):
    w = mx.random.normal((1024, 2048))  # 8 MiB, written into the .mlxfn with its data
    mx.eval(w)
    x = mx.ones((2, 1024))
    path = tmp_path / "big.mlxfn"
    from_file = graph.trace_file(lambda x: mx.exp(x @ w), x, path=path)
    assert path.stat().st_size > w.nbytes
    nodes = graph.trace(lambda x: mx.exp(x @ w), x)
    assert from_file == nodes == [
        Node("Matmul", None, (((2, 1024), F32), ((1024, 2048), F32)), (((2, 2048), F32),)),
        Node("Exp", None, (((2, 2048), F32),), (((2, 2048), F32),)),
    ]
    assert graph.bytes_moved(nodes) == (2 * 1024 + 1024 * 2048 + 2 * 2048) * 4 + 2 * 2 * 2048 * 4


def test_views_are_nodes_but_not_dispatches_or_bytes():
    def f(x):
        y = x.T.reshape(4, 8)[1:3]  # Transpose, Reshape, Slice
        y = mx.expand_dims(y, 0)  # ExpandDims
        y = mx.broadcast_to(y, (3, 2, 8))  # Broadcast
        return mx.exp(y).squeeze()  # Exp, then a Squeeze of no axis

    nodes = both(f, mx.ones((4, 8)))
    prims = [n.primitive for n in nodes]
    assert prims == ["Transpose", "Reshape", "Slice", "ExpandDims", "Broadcast", "Exp", "Squeeze"]
    assert nodes[2] == Node("Slice", None, (((4, 8), F32),), (((2, 8), F32),))
    assert graph.dispatches(nodes) == 1 and graph.by_primitive(nodes) == {"Exp": 1}
    assert graph.bytes_moved(nodes) == 2 * 3 * 2 * 8 * 4


def test_contiguous_is_traced_as_a_dispatch():
    original = mx.contiguous
    nodes = both(lambda x: mx.contiguous(x.T) * 2, mx.ones((3, 5)))
    assert mx.contiguous is original
    assert [n.primitive for n in nodes] == ["Transpose", "Contiguous", "Broadcast", "Multiply"]
    assert nodes[1] == Node("Contiguous", None, (((5, 3), F32),), (((5, 3), F32),))
    assert graph.dispatches(nodes) == 2


def test_compiled_code_is_inlined():
    @mx.compile
    def gelu_ish(x):
        return x * mx.sigmoid(1.702 * x)

    nodes = both(lambda x: gelu_ish(x) + 1, mx.ones((16,)))
    prims = [n.primitive for n in nodes]
    assert "Compiled" not in prims
    assert [p for p in prims if p not in graph.VIEWS] == ["Multiply", "Sigmoid", "Multiply", "Add"]


def test_state_layouts_across_many_primitives():
    """Every primitive here goes through the .mlxfn reader's state layouts; the callback trace must match it."""
    i2 = mx.array([1, 2], dtype=mx.int32)
    w3 = mx.ones((3, 2, 8))
    experts = mx.ones((2, 8, 3))

    def set_rows(x):
        y = x * 3
        y[1:3] = 0  # SliceUpdate
        return y

    def f(x):
        xi = x.astype(mx.int32)
        outs = [
            x // 2.0, mx.remainder(x, 3.0), x ** 2, mx.abs(-x), mx.sign(x), mx.floor(x), mx.ceil(x), mx.round(x),
            mx.arctan2(x, x + 1), mx.tanh(x), mx.sin(x), mx.cosh(x), mx.erf(x), mx.erfinv(x / 9), mx.expm1(x),
            mx.log1p(x), mx.log2(x) + mx.log10(x) + mx.log(x), mx.rsqrt(x) + mx.sqrt(x), mx.square(x),
            mx.maximum(x, 1) + mx.minimum(x, 1), mx.logaddexp(x, x), mx.logsumexp(x, axis=1),
            mx.softmax(x, axis=-1, precise=True), mx.sigmoid(x), mx.where(x > 1, x, -x),
            (xi << 1) | (xi & 3) ^ (xi >> 1), mx.logical_or(mx.logical_and(x > 0, x < 2), mx.logical_not(x > 3)),
            mx.array_equal(x, x, equal_nan=True), x == x, x != 1, x >= 1, x <= 1,
            mx.sum(x, axis=0), mx.max(x, axis=1), mx.prod(x), mx.all(x > 0), mx.any(x > 5), mx.mean(x, axis=1),
            mx.argmax(x, 1), mx.argmin(x, 0), mx.sort(x), mx.argsort(x), mx.partition(x, 2), mx.argpartition(x, 2),
            mx.topk(x, 2), mx.cumsum(x, axis=1), mx.cumprod(x, axis=0, reverse=True, inclusive=False),
            mx.cummax(x, axis=1),
            mx.pad(x, [(1, 2), (0, 1)]), mx.concatenate([x, x], axis=1), mx.stack([x, x]),
            mx.flatten(x), mx.unflatten(x, 1, (2, 4)), x.view(mx.int32), mx.split(x, [3, 5], axis=1)[1] + 0,
            mx.as_strided(x, (2, 2), (1, 1)), mx.stop_gradient(x),
            mx.take(x, i2, axis=0), x[i2], mx.take_along_axis(x, mx.zeros((4, 1), dtype=mx.int32), axis=1),
            x.at[i2].add(1.0), x.at[i2].maximum(0.5),
            mx.put_along_axis(x, mx.zeros((4, 1), dtype=mx.int32), mx.ones((4, 1)), axis=1),
            mx.slice_update(x, mx.ones((2, 8)), mx.array([1]), [0]), mx.slice(x, mx.array([1]), [0], [2, 8]),
            mx.searchsorted(mx.arange(8.0), x, side='right'), mx.arange(0.5, 8, 1.5), mx.full((3,), x[0, 0]),
            mx.conv1d(x[None], w3, stride=1, padding=1), mx.conv_general(x[None], w3, padding=([1], [2])),
            mx.hadamard_transform(x, scale=0.5), mx.fft.irfft(mx.fft.rfft(x)), mx.fft.fft(x).imag,
            mx.gather_mm(x[None], experts, rhs_indices=mx.array([1])),
            mx.block_masked_mm(mx.ones((64, 64)) * x[0, 0], mx.ones((64, 64)), 32,
                               mask_out=mx.ones((2, 2), dtype=mx.bool_)),
            mx.addmm(x, x, mx.eye(8), alpha=2.0, beta=0.5), mx.dequantize(*mx.quantize(mx.ones((8, 64)))),
            mx.random.uniform(shape=(3,), key=mx.random.key(0)), mx.matmul(x, x.T), mx.inner(x, x),
            mx.broadcast_arrays(x, mx.ones((2, 4, 8)))[1], mx.depends(x, x + 1), mx.conj(x),
            mx.real(mx.fft.fft(x)), set_rows(x),
            mx.linalg.inv(mx.eye(4) * 2, stream=mx.cpu), mx.linalg.eigh(mx.eye(4), UPLO="U", stream=mx.cpu)[0],
            mx.linalg.svd(mx.eye(4), stream=mx.cpu)[0], mx.linalg.qr(mx.eye(4), stream=mx.cpu)[0],
            mx.linalg.cholesky(mx.eye(4), upper=True, stream=mx.cpu), mx.linalg.eigvals(mx.eye(4), stream=mx.cpu),
            mx.linalg.tri_inv(mx.eye(4), upper=True, stream=mx.cpu),
        ]
        return outs

    nodes = both(f, mx.ones((4, 8)) * 1.5)
    prims = {n.primitive for n in nodes}
    expected = {
        "FloorDivide", "Remainder", "Power", "Abs", "Sign", "Floor", "Ceil", "Round", "ArcTan2", "Tanh", "Sin",
        "Cosh", "Erf", "ErfInv", "Expm1", "Log1p", "Log", "Log2", "Log10", "Sqrt", "Rsqrt", "Square", "Maximum",
        "Minimum", "LogAddExp", "LogSumExp", "Softmax", "Sigmoid", "Select", "LeftShift", "RightShift", "BitwiseOr",
        "BitwiseAnd", "BitwiseXor", "LogicalAnd", "LogicalOr", "LogicalNot", "Equal", "NaNEqual", "NotEqual",
        "GreaterEqual", "LessEqual", "Sum", "Max", "Prod", "And", "Or", "ArgReduce", "Sort", "ArgSort",
        "Partition", "ArgPartition", "CumSum", "CumProd", "CumMax", "Pad", "Concatenate", "Flatten", "Unflatten",
        "View", "Split", "AsStrided", "Gather", "GatherAxis", "Scatter", "ScatterAxis", "SliceUpdate",
        "DynamicSliceUpdate", "DynamicSlice", "SearchSorted", "Arange", "Full", "Convolution", "Hadamard", "FFT",
        "Imag", "Real", "GatherMM", "BlockMaskedMM", "AddMM", "Quantize", "RandomBits", "Matmul", "Broadcast",
        "Depends", "Inverse", "Eigh", "SVD", "QRF", "Cholesky", "Eig", "AsType", "ExpandDims", "Reshape", "Slice",
        "Squeeze", "Transpose", "Greater", "Less", "Divide", "Multiply", "Subtract", "Add", "Negative",
    }
    assert expected - prims == set()


def test_unexportable_primitive_named():
    with pytest.raises(GraphError, match="BitwiseInvert"):
        graph.trace(lambda x: ~x, mx.ones((3,), dtype=mx.int32))


def test_mlxfn_version_and_unknown_primitive_guards(tmp_path):
    path = tmp_path / "f.mlxfn"
    graph.trace_file(lambda x: mx.softmax(x, axis=-1), mx.ones((2, 3)), path=path)
    data = path.read_bytes()
    assert data.count(b"Softmax") == 1 and mx.__version__.encode() in data[:32]

    renamed = tmp_path / "renamed.mlxfn"
    renamed.write_bytes(data.replace(b"Softmax", b"Softmix"))
    with pytest.raises(GraphError, match="unknown primitive 'Softmix'"):
        graph.read_mlxfn(renamed)

    old = tmp_path / "old.mlxfn"
    old.write_bytes(data.replace(mx.__version__.encode(), b"0.1.0".ljust(len(mx.__version__), b"0"), 1))
    with pytest.raises(GraphError, match="written by MLX"):
        graph.read_mlxfn(old)

    truncated = tmp_path / "truncated.mlxfn"
    truncated.write_bytes(data[:-3])
    with pytest.raises(GraphError, match="truncated"):
        graph.read_mlxfn(truncated)


def _tiny_qwen3_5_moe():
    from mlx_lm.models import qwen3_5_moe

    text = dict(model_type="qwen3_5_moe_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=160,
                linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=32, full_attention_interval=4, tie_word_embeddings=False)
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict({"model_type": "qwen3_5_moe", "text_config": text}))
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    mx.eval(model.parameters())
    return model


def test_mlx_lm_qwen3_5_moe_decode_step():
    pytest.importorskip("mlx_lm")
    from mlx_lm.models.cache import make_prompt_cache

    model = _tiny_qwen3_5_moe()

    def decode_step():  # a fresh, prefilled cache each time: tracing leaves tracers in the cache it updates
        cache = make_prompt_cache(model)
        model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
        mx.eval([c.state for c in cache])
        return lambda tok: (model(tok, cache=cache), [c.state for c in cache])

    token = mx.array([[7]])
    nodes = graph.trace(decode_step(), token)
    assert graph.trace_file(decode_step(), token) == nodes
    prims = {n.primitive for n in nodes}
    assert {"Gather", "QuantizedMatmul", "GatherQMM", "Convolution", "Contiguous", "SliceUpdate",
            "ArgPartition"} <= prims
    assert "Compiled" not in prims and "CustomKernel" not in prims
    # 3 GatedDeltaNet layers and one attention layer, 4 MoE blocks
    counts = graph.by_primitive(nodes)
    assert counts["Contiguous"] == 3 and counts["Convolution"] == 3 and counts["SliceUpdate"] == 2
    assert counts["GatherQMM"] == 4 * 3
    lm_head = [n for n in nodes if n.primitive == "QuantizedMatmul" and n.outputs[0][0][-1] == 160]
    assert len(lm_head) == 1 and lm_head[0].inputs[1] == ((160, 8), "uint32")
    assert graph.dispatches(nodes) == sum(counts.values()) < len(nodes)
    assert graph.bytes_moved(nodes) > sum(_weight_bytes(model))
    assert graph.bytes_moved(nodes, touched_only=True) < graph.bytes_moved(nodes)


def _weight_bytes(model):
    from mlx.utils import tree_flatten

    return [v.nbytes for k, v in tree_flatten(model.parameters()) if "embed_tokens" not in k]


def test_touched_only_counts_what_gathers_and_updates_touch():
    w, s, b = mx.quantize(mx.random.normal((4, 32, 64)), group_size=32, bits=4)  # 4 experts
    table = mx.random.normal((100, 16))
    buf = mx.zeros((1, 2, 256, 16))
    mx.eval(w, s, b, table, buf)
    assert (w.nbytes, s.nbytes, b.nbytes) == (4096, 1024, 1024)

    def f(x, experts, tok, upd):
        y = mx.gather_qmm(x, w, s, b, rhs_indices=experts, transpose=True, group_size=32, bits=4)
        return y, table[tok], mx.slice_update(buf, upd, mx.array([3]), [2])

    nodes = both(f, mx.ones((1, 1, 64)), mx.array([[0, 2]], dtype=mx.uint32), mx.array([5]), mx.ones((1, 2, 1, 16)))
    prims = {n.primitive for n in nodes}
    assert {"GatherQMM", "Gather", "DynamicSliceUpdate"} <= prims
    saved = (4096 + 1024 + 1024) // 2 + (100 * 16 - 16) * 4 + 2 * (1 * 2 * 256 * 16 - 2 * 16) * 4
    assert graph.bytes_moved(nodes) - graph.bytes_moved(nodes, touched_only=True) == saved


def test_mlxfn_with_two_functions_sharing_a_constant(tmp_path):
    w = mx.ones((8, 8))
    mx.eval(w)
    path = str(tmp_path / "two.mlxfn")
    with mx.exporter(path, lambda x: mx.exp(x @ w)) as export:
        export(mx.ones((1, 8)))
        export(mx.ones((3, 8)))  # w is written once, with the first function
    first, second = graph.read_mlxfn(path, 0), graph.read_mlxfn(path, 1)
    assert [n.inputs for n in first if n.primitive == "Matmul"] == [(((1, 8), F32), ((8, 8), F32))]
    assert [n.inputs for n in second if n.primitive == "Matmul"] == [(((3, 8), F32), ((8, 8), F32))]
    with pytest.raises(GraphError, match="holds 2 function"):
        graph.read_mlxfn(path, 2)


def test_shapeless_mlxfn_reads(tmp_path):
    path = str(tmp_path / "shapeless.mlxfn")
    mx.export_function(path, lambda x, y: (mx.mean(x, axis=1), x + y), mx.ones((4, 8)), mx.ones((8,)), shapeless=True)
    nodes = graph.read_mlxfn(path)
    mean = [n for n in nodes if n.primitive == "NumberOfElements"]  # shapeless: the count is a node
    assert mean == [Node("NumberOfElements", None, (((4, 8), F32),), (((), F32),))]
    assert [n.primitive for n in nodes if n.primitive not in graph.VIEWS] == ["Sum", "Multiply", "Add"]
