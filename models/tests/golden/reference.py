"""Independent reference for fedward's BERT forward pass (NumPy only).

Reads tiny/model.safetensors (parsed by hand: 8-byte header length, JSON header, raw
little-endian f32), tiny/config.json and input.json, runs transformers'
BertForSequenceClassification forward in eval mode (no dropout) written from scratch, and
writes logits.json. Run: python3 models/tests/golden/reference.py (needs numpy).
"""
import json
import math
import os
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[base + start : base + end], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def forward(W, cfg, ids, mask):
    ids = np.array(ids)
    mask = np.array(mask, dtype=np.float64)
    b, l = ids.shape
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    dh = h // heads
    x = W["bert.embeddings.word_embeddings.weight"][ids]
    x = x + W["bert.embeddings.position_embeddings.weight"][np.arange(l)][None]
    x = x + W["bert.embeddings.token_type_embeddings.weight"][np.zeros_like(ids)]
    x = layer_norm(x, W["bert.embeddings.LayerNorm.weight"], W["bert.embeddings.LayerNorm.bias"], eps)
    bias = (1.0 - mask)[:, None, None, :] * -1e9
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        lin = lambda t, n: t @ W[p + n + ".weight"].T + W[p + n + ".bias"]
        split = lambda t: t.reshape(b, l, heads, dh).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        probs = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh) + bias)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, l, h)
        a = layer_norm(lin(ctx, "attention.output.dense") + x, W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        inter = gelu(lin(a, "intermediate.dense"))
        x = layer_norm(lin(inter, "output.dense") + a, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    pooled = np.tanh(x[:, 0] @ W["bert.pooler.dense.weight"].T + W["bert.pooler.dense.bias"])
    return pooled @ W["classifier.weight"].T + W["classifier.bias"]


def main():
    W = load_safetensors(os.path.join(HERE, "tiny", "model.safetensors"))
    with open(os.path.join(HERE, "tiny", "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(HERE, "input.json")) as f:
        inp = json.load(f)
    logits = forward(W, cfg, inp["input_ids"], inp["attention_mask"])
    with open(os.path.join(HERE, "logits.json"), "w") as f:
        json.dump([[round(float(v), 8) for v in row] for row in logits], f)
    print(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main()
