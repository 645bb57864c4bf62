"""Bench (not a test): `fedward-agent predict` on CPU against ONNX Runtime on the same
exported model and notes, the same threads, interleaved in one run (issue 21, item 8).

Run with `scripts/bench.sh onnx` (it builds the release binary and the pinned venv, then
calls `bench.py run`). Steps:
1. notes: `fedward-agent data synth` (seed 7, the demo's three sites), the first N notes
   of the test, validation and train splits in that order;
2. model: the pretrained MiniLM with a classification head drawn here from a seeded RNG
   (normal, std 0.5, so that the logits spread and the check below means something),
   written as a checkpoint and turned into a model directory by `fedward-agent export`:
   the same path a federation's global model takes;
3. ONNX: graph.py builds BertForSequenceClassification from that directory's
   model.safetensors; onnxruntime.transformers' optimizer (shipped inside the pinned
   onnxruntime wheel) makes the fused copy a deployment would use (Attention,
   SkipLayerNormalization, EmbedLayerNormalization, BiasGelu);
4. check: log-probabilities of predict and of each ORT graph on the first notes must agree
   within LOGPROB_TOLERANCE (absolute), with the same labels;
5. time: each side as its own process on the same notes file (load, tokenize, infer, write
   one JSON line per note: what `predict --input` does), threads pinned equal
   (RAYON_NUM_THREADS for candle's matmuls and the tokenizer; ORT intra_op_num_threads,
   inter_op 1), the same batches (predict's: chunks of 256 notes, batches of 32, each
   padded to its longest note, max_seq_len 128), interleaved fedward, ORT, ORT fused,
   fedward, ... ; samples/s from each process's wall time, its CPU seconds beside it.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import graph  # noqa: E402

LOGPROB_TOLERANCE = 1e-4
CHECK_NOTES = 64
# predict's batching (agent/src/main.rs PROGRESS_CHUNK, models/src/train.rs EVAL_BATCH).
CHUNK = 256
BATCH = 32


def sh(cmd, env=None, stdout=None):
    subprocess.run(cmd, check=True, env=env, stdout=stdout)


def prepare(agent, base, work, notes_n, seed):
    os.makedirs(work, exist_ok=True)
    corpus = f"{work}/corpus"
    if not os.path.exists(f"{corpus}/summary.json"):
        sh([agent, "data", "synth", "--out", corpus, "--seed", "7"], stdout=subprocess.DEVNULL)
    notes = []
    sites = sorted(d for d in os.listdir(corpus) if os.path.isdir(f"{corpus}/{d}"))
    for split in ("test", "validation", "train"):
        for s in sites:
            for line in open(f"{corpus}/{s}/{split}.jsonl"):
                if line.strip():
                    notes.append(json.loads(line)["text"])
    notes = notes[:notes_n]
    notes_path = f"{work}/notes.jsonl"
    with open(notes_path, "w") as f:
        for t in notes:
            f.write(json.dumps({"text": t}) + "\n")
    with open(f"{work}/check.jsonl", "w") as f:
        for t in notes[:CHECK_NOTES]:
            f.write(json.dumps({"text": t}) + "\n")

    # A checkpoint as the coordinator writes one: transformers' names, head included.
    w = graph.read_safetensors(f"{base}/model.safetensors")
    ck = {("bert." + k if not k.startswith("bert.") else k): v for k, v in w.items() if not k.endswith("position_ids")}
    rng = np.random.default_rng(seed)
    hidden = ck["bert.pooler.dense.weight"].shape[0]
    ck["classifier.weight"] = rng.normal(0.0, 0.5, (4, hidden)).astype(np.float32)
    ck["classifier.bias"] = rng.normal(0.0, 0.5, (4,)).astype(np.float32)
    graph.write_safetensors(f"{work}/checkpoint.safetensors", ck)
    model_dir = f"{work}/model"
    sh([agent, "export", "--checkpoint", f"{work}/checkpoint.safetensors", "--base", base, "--out", model_dir],
       stdout=subprocess.DEVNULL)

    plain = f"{work}/model.onnx"
    graph.build(model_dir, plain)
    fused = f"{work}/model-fused.onnx"
    config = json.load(open(f"{model_dir}/config.json"))
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        opt = optimize_model(plain, model_type="bert", num_heads=config["num_attention_heads"],
                             hidden_size=config["hidden_size"], opt_level=0)
        fusions = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(fused)
    except Exception as e:  # the bench still runs the plain graph
        print(f"transformers optimizer failed: {e}", file=sys.stderr)
        fused, fusions = None, {"error": str(e)}
    return notes_path, model_dir, plain, fused, fusions


def ort_predict(args):
    """The ORT side of the race as a process: predict's output format, predict's batching."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(max_length=args.max_seq_len)
    labels_map = json.load(open(f"{args.model_dir}/config.json"))["id2label"]
    labels = [labels_map[str(i)] for i in range(len(labels_map))]
    texts = [json.loads(line)["text"] for line in open(args.input) if line.strip()]
    out = sys.stdout
    for c in range(0, len(texts), CHUNK):
        encs = tok.encode_batch(texts[c:c + CHUNK])
        for b in range(0, len(encs), BATCH):
            batch = encs[b:b + BATCH]
            n, length = len(batch), max(len(e.ids) for e in batch)
            ids = np.zeros((n, length), np.int64)
            types = np.zeros((n, length), np.int64)
            mask = np.zeros((n, length), np.int64)
            for i, e in enumerate(batch):
                ids[i, :len(e.ids)] = e.ids
                types[i, :len(e.ids)] = e.type_ids
                mask[i, :len(e.ids)] = 1
            (logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            for row in p:
                probs = {l: float(v) for l, v in zip(labels, row)}
                out.write(json.dumps({"label": labels[int(row.argmax())], "probabilities": probs}) + "\n")


def timed(cmd, env, out_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(out_path, "w") as f:
        subprocess.run(cmd, check=True, env=env, stdout=f)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def read_logprobs(path, labels):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return np.log(np.array([[r["probabilities"][l] for l in labels] for r in rows], np.float64))


def run(args):
    work = os.path.abspath(args.work)
    notes, model_dir, plain, fused, fusions = prepare(args.agent, args.base, work, args.notes, args.seed)
    labels_map = json.load(open(f"{model_dir}/config.json"))["id2label"]
    labels = [labels_map[str(i)] for i in range(len(labels_map))]
    threads = str(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=threads, OMP_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="true",
               FEDWARD_LOG="warn")
    sides = {"fedward": lambda inp: [args.agent, "predict", "--model", model_dir, "--input", inp, "--device", "cpu",
                                     "--max-seq-len", str(args.max_seq_len)]}
    ort_cmd = lambda onnx_path: lambda inp: [sys.executable, os.path.abspath(__file__), "ort-predict", "--onnx", onnx_path,
                                             "--model-dir", model_dir, "--input", inp, "--threads", threads,
                                             "--max-seq-len", str(args.max_seq_len)]
    if args.also_agent:
        # Another build of fedward (e.g. before a change), timed in the same rounds.
        sides["fedward-other"] = lambda inp: [args.also_agent] + sides["fedward"](inp)[1:]
    sides["ort"] = ort_cmd(plain)
    if fused:
        sides["ort-fused"] = ort_cmd(fused)

    # The check: the same notes through every side, log-probabilities compared.
    check = {}
    for name, cmd in sides.items():
        timed(cmd(f"{work}/check.jsonl"), env, f"{work}/check-{name}.out")
        check[name] = read_logprobs(f"{work}/check-{name}.out", labels)
    agreement = {}
    for name in sides:
        if name == "fedward":
            continue
        diff = float(np.abs(check[name] - check["fedward"]).max())
        same = int((check[name].argmax(1) == check["fedward"].argmax(1)).sum())
        agreement[name] = {"max_abs_logprob_diff": diff, "same_label": same, "notes": len(check[name])}
        print(f"check {name:<10} vs fedward on {len(check[name])} notes: max |d log p| {diff:.2e}, same label {same}")
        if diff > LOGPROB_TOLERANCE or same != len(check[name]):
            sys.exit(f"{name} disagrees with predict beyond {LOGPROB_TOLERANCE}")

    # Startup (load, first batch) from a one-note run of each side, best of two.
    with open(f"{work}/one.jsonl", "w") as f:
        f.write(json.dumps({"text": "needs a bed on the ward"}) + "\n")
    startup = {name: min(timed(cmd(f"{work}/one.jsonl"), env, os.devnull)[0] for _ in range(2)) for name, cmd in sides.items()}

    n = sum(1 for line in open(notes) if line.strip())
    runs = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, cmd in sides.items():
            wall, cpu = timed(cmd(notes), env, f"{work}/{name}.out")
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "samples_per_s": n / wall})
            print(f"round {r + 1} {name:<10} {n} notes in {wall:6.2f} s: {n / wall:7.1f} samples/s, cpu {cpu:6.2f} s")
    best = {name: max(x["samples_per_s"] for x in v) for name, v in runs.items()}
    ort_best = max(v for k, v in best.items() if k.startswith("ort"))
    ratio = {k: best["fedward"] / v for k, v in best.items() if k != "fedward"}
    print(f"startup (1 note): " + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()))
    print("best samples/s: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    print("predict / ORT: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()) + f"; vs the faster ORT {best['fedward'] / ort_best:.2f}x")
    report = {
        "notes": n, "threads": args.threads, "max_seq_len": args.max_seq_len, "batch": BATCH, "chunk": CHUNK,
        "logprob_tolerance": LOGPROB_TOLERANCE, "check": agreement, "ort_fusions": fusions, "startup_s": startup,
        "runs": runs, "best_samples_per_s": best, "ratio_fedward_over": ratio,
        "ratio_fedward_over_best_ort": best["fedward"] / ort_best,
        "versions": versions(),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


def versions():
    import onnx
    import onnxruntime
    import tokenizers
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--agent", required=True, help="the release fedward-agent binary")
    r.add_argument("--base", required=True, help="the pretrained base directory (models-data/all-MiniLM-L6-v2)")
    r.add_argument("--work", required=True, help="scratch directory (notes, model, graphs, outputs)")
    r.add_argument("--out", required=True, help="the JSON report")
    r.add_argument("--notes", type=int, default=1000)
    r.add_argument("--threads", type=int, default=os.cpu_count())
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--max-seq-len", type=int, default=128)
    r.add_argument("--seed", type=int, default=0, help="the classification head's seed")
    r.add_argument("--also-agent", help="another fedward-agent build to time in the same rounds (before/after a change)")
    o = sub.add_parser("ort-predict")
    o.add_argument("--onnx", required=True)
    o.add_argument("--model-dir", required=True)
    o.add_argument("--input", required=True)
    o.add_argument("--threads", type=int, required=True)
    o.add_argument("--max-seq-len", type=int, default=128)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else ort_predict(args)


if __name__ == "__main__":
    main()
