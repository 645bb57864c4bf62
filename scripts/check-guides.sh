#!/usr/bin/env bash
# Runs the commands of the role guides, docs/ADMIN.md and docs/HOSPITAL-IT.md, against the
# built binaries in a throwaway directory, so that the guides cannot rot (about a minute
# once the two binaries are built; no network, no root, nothing outside the scratch dir).
#
#   scripts/check-guides.sh        (FEDWARD_BIN_DIR=DIR to use binaries other than target/debug;
#                                   KEEP=1 to keep the scratch directory for a look afterwards)
#
# Every ```sh block of the two guides must follow a marker line (an HTML comment, invisible
# when the page is rendered):
#   <!-- check: run STEP -->          run the block; it must exit 0
#   <!-- check: start STEP NAME -->   a daemon, one command: started in the background as NAME
#                                     (its log in the scratch dir's logs/NAME.log)
#   <!-- check: skip (WHY) -->        not run here (systemctl, apt, a real editor...): counted
#                                     and listed with its reason
# and two markers stand alone, with no block after them:
#   <!-- check: wait STEP NAME SECS --> wait for daemon NAME to exit 0 within SECS seconds
#   <!-- check: stop STEP NAME -->      SIGTERM to NAME (what `systemctl stop` sends): it must
#                                       exit 0 within 30 s
# Blocks run in the order of STEP (an integer; never decreasing within a guide), ADMIN.md
# before HOSPITAL-IT.md within a step, each in its own `bash -euo pipefail`, and the first
# failure stops the check. HOSPITAL-IT.md runs once per site, for st-marys and northfield
# (the example config's two sites; "st-marys" becomes "northfield" in its blocks the
# second time), so that a round reaches the quorum of two.
#
# The scratch directory stands for three machines and the mail between them:
#   root-admin/, root-st-marys/, root-northfield/   each machine's /etc/fedward,
#       /var/lib/fedward and /opt/fedward (in a block's text, and in every *.toml under
#       its etc/fedward after each block, "/etc/fedward" becomes "ROOT/etc/fedward", and
#       so on), so the guides keep the real paths;
#   work/   the directory every block runs in: what the admin and the hospitals send each
#       other (requests, certificates), and a release tree (deploy/ of this checkout, and
#       models-data/ linked to this checkout's base model);
#   bin/    fedward-agent and fedward-coordinator, first on PATH.
# Ports and addresses are rewritten the same way (free ports for 7443, 7080, 8479 and 8480,
# each hospital its own; fedward.consortium.example:7443 becomes 127.0.0.1:PORT), and in
# the installed configs only: [federation] rounds becomes 1 and [agent] max_backoff "2s",
# to keep the run short. FEDWARD_ADMIN_URL points `fedward-coordinator admin` at the
# scratch admin port. Daemons still running at the end get SIGTERM and must exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

fail() { echo "check-guides: $*" >&2; exit 1; }
python3 -c 'import sys; assert sys.version_info >= (3, 8)' 2>/dev/null || fail "needs python3 (3.8+)"
[ -f models-data/all-MiniLM-L6-v2/model.safetensors ] || fail "needs the base model: scripts/fetch-models.sh"
bin_dir=${FEDWARD_BIN_DIR:-$root/target/debug}
bin_dir=$(cd "$bin_dir" 2>/dev/null && pwd || echo "$bin_dir")  # relative to the caller, not the scratch directory
for b in fedward-agent fedward-coordinator; do
  [ -x "$bin_dir/$b" ] || fail "no $bin_dir/$b: cargo build -p fedward-agent -p fedward-coordinator (or set FEDWARD_BIN_DIR)"
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/fedward-guides.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "check-guides: scratch directory kept: $scratch"; else trap 'rm -rf "$scratch"' EXIT; fi

python3 - "$root" "$bin_dir" "$scratch" <<'PY'
import os, re, shutil, signal, socket, subprocess, sys, time

root, bin_dir, scratch = sys.argv[1:4]
GUIDES = [("admin", "docs/ADMIN.md"), ("hospital", "docs/HOSPITAL-IT.md")]
SITES = ["st-marys", "northfield"]
BLOCK_TIMEOUT = 180
started = time.monotonic()
procs, counted = {}, 0   # daemons by name; blocks run

def die(msg):
    print(f"check-guides: {msg}", file=sys.stderr)
    print("check-guides: KEEP=1 keeps the scratch directory (logs/ holds every block's output)", file=sys.stderr)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    sys.exit(1)

# --- the guides' blocks -------------------------------------------------------------------
MARK = re.compile(r"^<!--\s*check:\s*(.*?)\s*-->\s*$")
items, skipped, skipped_text = [], [], []   # items: (step, guide index, order, guide, line, kind, arg, text)
for gi, (role, path) in enumerate(GUIDES):
    lines = open(os.path.join(root, path), encoding="utf-8").read().split("\n")
    pending, last_step, i = None, -1, 0
    while i < len(lines):
        line = lines[i]
        m = MARK.match(line.strip())
        if m:
            if pending:
                die(f"{path}:{pending[0]}: marker not followed by a ```sh block")
            words = m.group(1).split()
            kind = words[0] if words else ""
            if kind == "skip":
                why = m.group(1)[4:].strip()
                if not (why.startswith("(") and why.endswith(")") and len(why) > 2):
                    die(f"{path}:{i+1}: a skip marker says why, in parentheses: <!-- check: skip (why) -->")
                pending = (i + 1, "skip", why[1:-1], None)
            elif kind in ("run", "start", "wait", "stop"):
                want = {"run": 2, "start": 3, "wait": 4, "stop": 3}[kind]
                if len(words) != want or not words[1].isdigit():
                    die(f"{path}:{i+1}: malformed marker: {line.strip()}")
                step = int(words[1])
                if step < last_step:
                    die(f"{path}:{i+1}: step {step} after step {last_step}: steps never decrease within a guide")
                last_step = step
                if kind in ("wait", "stop"):
                    items.append((step, gi, i, path, i + 1, kind, words[2:], None))
                else:
                    pending = (i + 1, kind, words[2:], step)
            else:
                die(f"{path}:{i+1}: unknown marker: {line.strip()}")
            i += 1
            continue
        fence = re.match(r"^(\s*)```(\S*)\s*$", line)
        if fence:
            lang, body, j = fence.group(2), [], i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                body.append(lines[j][len(fence.group(1)):])
                j += 1
            if j == len(lines):
                die(f"{path}:{i+1}: unclosed code block")
            text = "\n".join(body) + "\n"
            if lang == "sh":
                if not pending:
                    die(f"{path}:{i+1}: a ```sh block without a marker (<!-- check: run STEP --> or <!-- check: skip (why) -->)")
                _, kind, arg, step = pending
                if kind == "skip":
                    skipped.append((path, i + 1, arg))
                    skipped_text.append((path, i + 1, arg, text))
                else:
                    items.append((step, gi, i, path, i + 1, kind, arg, text))
            elif pending:
                die(f"{path}:{pending[0]}: marker followed by a ```{lang} block, not ```sh")
            pending = None
            i = j + 1
            continue
        if pending and line.strip():
            die(f"{path}:{pending[0]}: marker not directly followed by a ```sh block")
        i += 1
    if pending:
        die(f"{path}:{pending[0]}: marker at the end of the file")
items.sort(key=lambda t: (t[0], t[1], t[2]))

# --- the scratch world --------------------------------------------------------------------
def free_port():
    # UDP and TCP both free (the coordinator's port is QUIC, the others HTTP).
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        if port not in (7443, 7080, 8479, 8480):
            return port

bin_link = os.path.join(scratch, "bin")
os.makedirs(bin_link)
for b in ("fedward-agent", "fedward-coordinator"):
    os.symlink(os.path.join(bin_dir, b), os.path.join(bin_link, b))
work = os.path.join(scratch, "work")
os.makedirs(os.path.join(work, "models-data"))
os.symlink(os.path.join(root, "models-data", "all-MiniLM-L6-v2"), os.path.join(work, "models-data", "all-MiniLM-L6-v2"))
shutil.copytree(os.path.join(root, "deploy", "config"), os.path.join(work, "deploy", "config"))
shutil.copytree(os.path.join(root, "deploy", "systemd"), os.path.join(work, "deploy", "systemd"))
logs = os.path.join(scratch, "logs")
os.makedirs(logs)

quic, admin_port = free_port(), free_port()
ctx = {}   # context name -> (role root, rewrite list, site)
for name in ["admin"] + SITES:
    r = os.path.join(scratch, "root-" + name)
    os.makedirs(r)
    rules = [
        (re.compile(r"fedward\.consortium\.example:7443\b"), f"127.0.0.1:{quic}"),
        (re.compile(r"0\.0\.0\.0:7443\b"), f"127.0.0.1:{quic}"),
        (re.compile(r"(?<![\w.-])/(etc|var/lib|opt)/fedward\b"), lambda m, r=r: f"{r}/{m.group(1)}/fedward"),
        (re.compile(r":7443\b"), f":{quic}"),
        (re.compile(r":7080\b"), f":{admin_port}"),
        (re.compile(r":8479\b"), f":{free_port()}"),
        (re.compile(r":8480\b"), f":{free_port()}"),
    ]
    if name not in ("admin", SITES[0]):
        rules.append((re.compile(re.escape(SITES[0])), name))
    ctx[name] = (r, rules, name)
FILE_RULES = [
    (re.compile(r"^rounds = \d+", re.M), "rounds = 1"),
    (re.compile(r'^max_backoff = "[^"]*"', re.M), 'max_backoff = "2s"'),
]

def rewrite(text, rules):
    for pat, rep in rules:
        text = pat.sub(rep, text)
    return text

def rewrite_configs(r, rules):
    etc = os.path.join(r, "etc", "fedward")
    for dirpath, _, files in os.walk(etc):
        for f in files:
            if f.endswith(".toml"):
                p = os.path.join(dirpath, f)
                old = open(p, encoding="utf-8").read()
                new = rewrite(rewrite(old, rules), FILE_RULES)
                if new != old:
                    open(p, "w", encoding="utf-8").write(new)

env = dict(os.environ)
env["PATH"] = bin_link + os.pathsep + env.get("PATH", "")
env["FEDWARD_ADMIN_URL"] = f"http://127.0.0.1:{admin_port}"
env.setdefault("FEDWARD_LOG", "info")
env.pop("FEDWARD_ADMIN_TOKEN", None)

# --- skipped blocks: their fedward commands must at least name real subcommands and flags --
help_cache = {}
def help_of(binary, subs):
    key = (binary, tuple(subs))
    if key not in help_cache:
        r = subprocess.run([os.path.join(bin_dir, binary), *subs, "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env)
        help_cache[key] = r.stdout.decode(errors="replace") if r.returncode == 0 else None
    return help_cache[key]

def commands_in(help_text):
    m = re.search(r"^Commands:\n((?:  .*\n)+)", help_text, re.M)
    return {l.split()[0] for l in m.group(1).splitlines() if l.strip()} if m else set()

flag_checks = 0
for path, line, why, text in skipped_text:
    joined = re.sub(r"\\\n\s*", " ", text)
    for cmd in joined.split("\n"):
        words = cmd.split("#")[0].split()
        if not words or words[0] not in ("fedward-agent", "fedward-coordinator"):
            continue
        subs = []
        for w in words[1:]:
            if w.startswith("-"):
                break
            if w in commands_in(help_of(words[0], subs) or ""):
                subs.append(w)
            else:
                break
        h = help_of(words[0], subs)
        if h is None:
            die(f"{path}:{line}: skipped block: `{words[0]} {' '.join(subs)} --help` fails")
        for w in words[1:]:
            if w.startswith("--"):
                flag = w.split("=")[0]
                if not re.search(re.escape(flag) + r"\b", h):
                    die(f"{path}:{line}: skipped block: `{words[0]} {' '.join(subs)}` has no {flag}")
                flag_checks += 1

# --- the run ----------------------------------------------------------------------------
def first_line(text):
    for l in text.split("\n"):
        if l.strip() and not l.strip().startswith(("#", "umask ")):
            return l.strip()[:70]
    return ""

def stop(name, where):
    p = procs.get(name)
    if p is None:
        die(f"{where}: no daemon named {name} was started")
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            die(f"{where}: {name} did not stop within 30 s of SIGTERM; its log: {scratch}/logs/{name}.log")
    if p.returncode != 0:
        tail = open(os.path.join(logs, name + ".log"), errors="replace").read()[-1500:]
        die(f"{where}: {name} exited {p.returncode}, not 0:\n{tail}")
    del procs[name]

for step, gi, _, path, line, kind, arg, text in items:
    where = f"{path}:{line}"
    contexts = ["admin"] if GUIDES[gi][0] == "admin" else SITES
    for c in contexts:
        r, rules, site = ctx[c]
        label = f"{where} [{site}]" if c != "admin" else where
        t0 = time.monotonic()
        if kind == "wait":
            name, secs = f"{c}-{arg[0]}", float(arg[1])
            p = procs.get(name) or die(f"{where}: no daemon named {name} was started")
            try:
                p.wait(secs)
            except subprocess.TimeoutExpired:
                tail = open(os.path.join(logs, name + ".log"), errors="replace").read()[-1500:]
                die(f"{where}: {name} did not finish within {secs:.0f} s:\n{tail}")
            if p.returncode != 0:
                tail = open(os.path.join(logs, name + ".log"), errors="replace").read()[-1500:]
                die(f"{where}: {name} exited {p.returncode}:\n{tail}")
            del procs[name]
            print(f"  ok  {label:34} step {step:2}  {time.monotonic()-t0:5.1f}s  (waited for {name} to finish, exit 0)")
            continue
        if kind == "stop":
            name = f"{c}-{arg[0]}"
            stop(name, where)
            print(f"  ok  {label:34} step {step:2}  {time.monotonic()-t0:5.1f}s  (SIGTERM to {name}: exit 0)")
            continue
        body = rewrite(text, rules)
        counted += 1
        if kind == "start":
            name = f"{c}-{arg[0]}"
            cmd = [l for l in body.split("\n") if l.strip() and not l.strip().startswith("#")]
            if len(cmd) != 1:
                die(f"{where}: a start block holds exactly one command")
            if name in procs:
                die(f"{where}: {name} is already running")
            log = open(os.path.join(logs, name + ".log"), "ab")
            procs[name] = subprocess.Popen(["bash", "-c", "exec " + cmd[0]], cwd=work, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            time.sleep(0.5)
            if procs[name].poll() is not None:
                tail = open(os.path.join(logs, name + ".log"), errors="replace").read()[-1500:]
                die(f"{where}: {name} exited {procs[name].returncode} at once:\n{tail}")
            print(f"  ok  {label:34} step {step:2}  {time.monotonic()-t0:5.1f}s  started {name}: {first_line(text)}")
            continue
        try:
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=work, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            die(f"{label}: the block ran past {BLOCK_TIMEOUT} s")
        out = res.stdout.decode(errors="replace")
        with open(os.path.join(logs, "blocks.log"), "a") as f:
            f.write(f"==== {label} (exit {res.returncode})\n{body}---- output\n{out}\n")
        if res.returncode != 0:
            die(f"{label}: the block exited {res.returncode}\n---- block (as run)\n{body}---- output\n{out[-3000:]}")
        rewrite_configs(r, rules)
        print(f"  ok  {label:34} step {step:2}  {time.monotonic()-t0:5.1f}s  {first_line(text)}")

for name in list(procs):
    stop(name, "at the end")
    print(f"  ok  SIGTERM to {name} at the end: exit 0")

runnable = sum(1 for t in items if t[5] in ("run", "start"))
print(f"check-guides: {runnable} blocks run ({counted} runs: HOSPITAL-IT.md's once per site), "
      f"{len(skipped)} skipped (their {flag_checks} fedward flags checked against --help), "
      f"in {time.monotonic()-started:.0f} s")
for path, line, why in skipped:
    print(f"  skipped  {path}:{line}  ({why})")
PY
