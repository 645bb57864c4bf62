"""Builds the ONNX graph of BertForSequenceClassification by hand from an exported model
directory's weights (config.json, model.safetensors with transformers' names), the same
computation as fedward's models/src/bert.rs in inference: embeddings (word + token type +
absolute position) and LayerNorm, N encoder layers (self-attention with the additive
padding mask, output dense + residual + LayerNorm, GELU in its erf form, FFN + residual +
LayerNorm), the pooler (dense + tanh over [CLS]) and the classifier.

The node pattern is the one a PyTorch export of transformers' BERT gives (MatMul + Add,
Reshape/Transpose per head, Div by sqrt(head size), Add mask, Softmax, the mask built as
Unsqueeze, Cast, Sub, Mul), so ONNX Runtime's graph optimizer and its transformers
optimizer (onnxruntime.transformers.optimizer) recognise it as they would a real export.
"""

import json
import math
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def read_safetensors(path):
    """name -> numpy array (F32 and I64 only: what an export holds)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
        out[name] = arr.copy()
    return out


def write_safetensors(path, tensors):
    """Writes f32 tensors (name -> numpy array) in safetensors format, names sorted."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        b = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


class Builder:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def init(self, name, arr):
        # np.ascontiguousarray would turn a scalar into shape (1,).
        self.inits.append(numpy_helper.from_array(np.require(arr, requirements="C"), name))
        return name

    def const(self, hint, arr):
        return self.init(self.name(hint), np.asarray(arr))

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def build(model_dir, out_path):
    """Writes the ONNX model of the exported directory to out_path; returns its labels."""
    config = json.load(open(f"{model_dir}/config.json"))
    w = read_safetensors(f"{model_dir}/model.safetensors")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    dh = hidden // heads
    eps = float(config["layer_norm_eps"])
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    g = Builder()

    def weight(name):
        return g.init(name, w[name].astype(np.float32))

    def linear(x, prefix):
        # transformers' Linear exports as MatMul with the transposed weight, then Add.
        wt = g.init(f"{prefix}.weight_t", w[f"{prefix}.weight"].T.astype(np.float32))
        return g.op("Add", [g.op("MatMul", [x, wt]), weight(f"{prefix}.bias")])

    def layer_norm(x, prefix):
        return g.op("LayerNormalization", [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")], axis=-1, epsilon=eps)

    # Embeddings: positions 0..len, as transformers' absolute position ids.
    e = "bert.embeddings"
    words = g.op("Gather", [weight(f"{e}.word_embeddings.weight"), "input_ids"])
    types = g.op("Gather", [weight(f"{e}.token_type_embeddings.weight"), "token_type_ids"])
    length = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one", np.array([1], np.int64))], axis=0)
    positions = g.op("Slice", [weight(f"{e}.position_embeddings.weight"), g.const("zero", np.array([0], np.int64)), length,
                               g.const("axis0", np.array([0], np.int64))])
    x = layer_norm(g.op("Add", [g.op("Add", [words, types]), positions]), f"{e}.LayerNorm")

    # Additive mask (batch, 1, 1, len): 0 to keep, -1e9 for padding (fedward's value; any
    # value that drives exp() to zero gives the same probabilities).
    m = g.op("Unsqueeze", ["attention_mask", g.const("axes", np.array([1], np.int64))])
    m = g.op("Unsqueeze", [m, g.const("axes", np.array([2], np.int64))])
    m = g.op("Cast", [m], to=TensorProto.FLOAT)
    m = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), m])
    mask_bias = g.op("Mul", [m, g.const("neg", np.array(-1e9, np.float32))])

    split_shape = g.const("split", np.array([0, 0, heads, dh], np.int64))
    merge_shape = g.const("merge", np.array([0, 0, hidden], np.int64))
    scale = g.const("sqrt_dh", np.array(math.sqrt(dh), np.float32))
    for layer in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{layer}"
        q = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.attention.self.query"), split_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.attention.self.key"), split_shape])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [linear(x, f"{p}.attention.self.value"), split_shape])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), scale]), mask_bias])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape])
        attn = layer_norm(g.op("Add", [linear(ctx, f"{p}.attention.output.dense"), x]), f"{p}.attention.output.LayerNorm")
        # GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)), as transformers' "gelu" and candle's gelu_erf.
        h = linear(attn, f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Div", [h, g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))])])
        gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, g.const("one_f", np.array(1.0, np.float32))])]),
                            g.const("half", np.array(0.5, np.float32))])
        x = layer_norm(g.op("Add", [linear(gelu, f"{p}.output.dense"), attn]), f"{p}.output.LayerNorm")

    cls = g.op("Gather", [x, g.const("cls", np.array(0, np.int64))], axis=1)
    pooled = g.op("Tanh", [linear(cls, "bert.pooler.dense")])
    logits = linear(pooled, "classifier")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])]
    graph = helper.make_graph(g.nodes, "bert_for_sequence_classification", ins, outs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedward-bench-onnx")
    model.ir_version = 8  # opset 17; the IR onnx writes by default is newer than ORT reads
    onnx.checker.check_model(model)
    onnx.save(model, out_path)
    return labels
