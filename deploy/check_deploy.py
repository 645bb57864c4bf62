#!/usr/bin/env python3
"""Offline checks of the shipped deployment files against the example configs and against
what deploy/docker/prepare.sh makes. Driven by scripts/check-deploy.sh; needs python3 and
PyYAML (Debian: python3-yaml), nothing from the network.

  check_deploy.py systemd                      hardening, stop signal, state directories
  check_deploy.py compose MIRROR PLAN_JSON     MIRROR/deploy/docker holds compose.yaml and
                                               the prepared local/; writes the live plan
  check_deploy.py k8s                          structure and agreement with deploy/config/

Each prints what it checked and exits 1 with every problem listed.
"""

import ipaddress
import json
import os
import re
import sys
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = []


def problem(msg):
    PROBLEMS.append(msg)


def ok(msg):
    print(f"  ok: {msg}")


def load_toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def example(kind):
    return load_toml(os.path.join(ROOT, "deploy", "config", f"{kind}.toml"))


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host):
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


# The files each config names that must exist where the process runs; directories it
# writes. Keys as in the example configs.
COORD_FILES = [("tls", "ca_cert"), ("tls", "cert"), ("tls", "key"), ("admin", "tokens"), ("renewal", "issuing_cert"),
               ("renewal", "issuing_key"), ("ledger", "signing_key"), ("model", "init"), ("tls", "crl")]
# Directories it writes, and files it appends to (their directory must be writable).
COORD_DIRS = [("server", "state_dir"), ("ledger", "file")]
AGENT_FILES = [("tls", "ca_cert"), ("tls", "cert"), ("tls", "key"), ("data", "train"), ("data", "validation"),
               ("model", "base")]
AGENT_DIRS = [("agent", "state_dir"), ("data", "feedback")]
APPENDED = {("ledger", "file"), ("data", "feedback")}
# What the image carries (deploy/docker/Dockerfile), and where it comes from here.
IMAGE_FILES = {"/opt/fedward/models-data": os.path.join(ROOT, "models-data")}


def get(cfg, sec, key):
    return cfg.get(sec, {}).get(key)


# Which listen address each process's probe must reach.
def bind_of(cfg, binary, sub):
    if binary == "fedward-coordinator":
        return get(cfg, "server", "admin_listen") or "127.0.0.1:7080"
    if sub == "serve":
        return get(cfg, "service", "listen") or "127.0.0.1:8480"
    return get(cfg, "agent", "status_listen") or "127.0.0.1:8479"


PROBE = re.compile(r"/dev/tcp/([^/\s]+)/(\d+) .*GET (\S+) HTTP")


def check_probe(where, shell, words, bind):
    """A probe run inside the container: bash (/dev/tcp is bash's, not dash's), reaching
    the address the config binds, for the route that process serves."""
    text = " ".join(words)
    m = PROBE.search(text)
    if not m:
        problem(f"{where}: probe {text!r} is not a /dev/tcp HTTP request")
        return
    if words[0] != "bash":
        problem(f"{where}: probe runs {shell or words[0]!r}, but /dev/tcp needs bash (Debian's sh is dash)")
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    bhost, bport = split_addr(bind)
    if port != bport:
        problem(f"{where}: probe reaches port {port}, the config binds {bind}")
    elif not (host == bhost or (bhost in ("0.0.0.0", "::") and is_loopback(host))):
        problem(f"{where}: probe reaches {host}, the config binds {bind}")
    else:
        ok(f"{where}: probe GET {path} reaches {host}:{port}, which the config binds ({bind})")
    return path


# ---------------------------------------------------------------------------------------
def check_systemd():
    units = {
        "fedward-coordinator.service": ("fedward-coordinator", "serve", "coordinator", 60),
        "fedward-agent.service": ("fedward-agent", "run", "agent", 60),
        "fedward-triage.service": ("fedward-agent", "serve", "agent", 10),
    }
    for unit, (binary, sub, cfg_kind, min_stop) in units.items():
        path = os.path.join(ROOT, "deploy", "systemd", unit)
        kv = {}
        for line in open(path):
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                k, _, v = line.partition("=")
                kv.setdefault(k, []).append(v)
        one = lambda k: (kv.get(k) or [None])[-1]
        for key, want in [("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("KillSignal", "SIGTERM")]:
            if one(key) != want:
                problem(f"{unit}: {key}={one(key)}, expected {want}")
        user = one("User")
        if not user or user == "root" or one("DynamicUser") == "yes":
            problem(f"{unit}: needs a dedicated User= (found {user!r})")
        stop = one("TimeoutStopSec")
        secs = None
        if stop:
            m = re.fullmatch(r"(\d+)(s|min)?", stop)
            secs = int(m.group(1)) * (60 if m.group(2) == "min" else 1) if m else None
        if secs is None or secs < min_stop:
            problem(f"{unit}: TimeoutStopSec={stop} leaves the drain less than {min_stop} s")
        start = one("ExecStart") or ""
        want = f"/usr/local/bin/{binary} {sub} --config /etc/fedward/{cfg_kind}.toml"
        if start != want:
            problem(f"{unit}: ExecStart={start!r}, expected {want!r}")
        state = one("StateDirectory")
        cfg = example(cfg_kind)
        cfg_state = get(cfg, "server" if cfg_kind == "coordinator" else "agent", "state_dir")
        if not state or f"/var/lib/{state}" != cfg_state:
            problem(f"{unit}: StateDirectory={state} but deploy/config/{cfg_kind}.toml's state_dir is {cfg_state}")
        # Under ProtectSystem=strict only the state directory and ReadWritePaths are
        # writable: everything the process writes must be there.
        writable = [f"/var/lib/{state}"] + [p for v in kv.get("ReadWritePaths", []) for p in v.split()]
        writes = [cfg_state]
        if cfg_kind == "agent" and get(cfg, "tls", "auto_renew") and sub == "run":
            writes.append(os.path.dirname(get(cfg, "tls", "cert")))
        for w in writes:
            if not any(w == p or w.startswith(p.rstrip("/") + "/") for p in writable):
                problem(f"{unit}: the process writes {w}, which ProtectSystem=strict leaves read-only")
        ok(f"{unit}: ProtectSystem=strict, NoNewPrivileges, User={user}, StateDirectory={state} "
           f"(= the example's state_dir), KillSignal=SIGTERM, TimeoutStopSec={stop}")


# ---------------------------------------------------------------------------------------
def mounts_of(svc, base):
    """Container path -> (host path, writable) for each bind mount."""
    table = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        src, dst = parts[0], parts[1]
        if not src.startswith((".", "/")):
            problem(f"compose: {v}: a named volume; the prepared bind mounts keep state with the host user's rights")
            continue
        host = os.path.normpath(os.path.join(base, src))
        if not os.path.exists(host):
            problem(f"compose: {v}: {host} does not exist after prepare.sh")
        table[dst] = (host, len(parts) < 3 or parts[2] != "ro")
    return table


def to_host(path, table, want_write=False):
    """The host path a container path resolves to (longest mount prefix, else the image)."""
    best = None
    for dst in list(table) + list(IMAGE_FILES):
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            if best is None or len(dst) > len(best):
                best = dst
    if best is None:
        return None, False
    host, writable = table.get(best, (IMAGE_FILES.get(best), False))
    return host + path[len(best):], writable


def check_image():
    """The image the compose file and the manifests run: a toolchain the workspace accepts,
    the base model where the example configs look for it, no keys or build output sent to
    the builder."""
    before = len(PROBLEMS)
    docker = os.path.join(ROOT, "deploy", "docker")
    text = open(os.path.join(docker, "Dockerfile")).read()
    want = load_toml(os.path.join(ROOT, "Cargo.toml"))["workspace"]["package"]["rust-version"]
    m = re.search(r"(?m)^FROM rust:(\d+)\.(\d+)", text)
    if not m or (int(m.group(1)), int(m.group(2))) < tuple(int(x) for x in want.split(".")[:2]):
        problem(f"Dockerfile: {m and m.group(0)} is older than the workspace's rust-version {want}")
    for dst, src in IMAGE_FILES.items():
        if not re.search(rf"(?m)^COPY {os.path.basename(src)}/(\S+) {dst}/\1$", text):
            problem(f"Dockerfile: does not copy {os.path.basename(src)}/ to {dst}, where the example configs look")
    ignored = open(os.path.join(docker, "Dockerfile.dockerignore")).read().split()
    for must in ("target/", "deploy/docker/local/", ".git/"):
        if must not in ignored:
            problem(f"Dockerfile.dockerignore: does not leave out {must}")
    if len(PROBLEMS) == before:
        ok(f"Dockerfile: rust {m.group(1)}.{m.group(2)} >= rust-version {want}; the base model at {', '.join(IMAGE_FILES)}; "
           "target/ and the prepared keys left out of the build context")


def check_compose(mirror, plan_path):
    check_image()
    base = os.path.join(mirror, "deploy", "docker")
    compose = yaml.safe_load(open(os.path.join(base, "compose.yaml")))
    env = dict(l.strip().split("=", 1) for l in open(os.path.join(base, ".env")) if "=" in l)
    for k in ("FEDWARD_UID", "FEDWARD_GID"):
        if k not in env:
            problem(f"compose: prepare.sh's .env lacks {k}")
    services = compose["services"]
    coord_listen = None
    # The live run on this host uses free ports in place of the configs' (other processes
    # here may hold the defaults), in the configs and the probes alike.
    ports = {}
    plan = []
    order = sorted(services, key=lambda n: ("coordinator" not in n, "triage" in n, n))
    for name in order:
        svc = services[name]
        if "${FEDWARD_UID" not in str(svc.get("user", "")):
            problem(f"compose: {name}: not run as the user who owns the prepared files (user: ${{FEDWARD_UID}})")
        entry = (svc.get("entrypoint") or ["/usr/local/bin/fedward-coordinator"])[0]
        binary = os.path.basename(entry)
        args = svc["command"]
        sub, cfg_in = args[0], args[args.index("--config") + 1]
        table = mounts_of(svc, base)
        cfg_host, _ = to_host(cfg_in, table)
        if not cfg_host or not os.path.isfile(cfg_host):
            problem(f"compose: {name}: its config {cfg_in} is not mounted from a prepared file")
            continue
        cfg = load_toml(cfg_host)
        coordinator = binary == "fedward-coordinator"
        files, dirs = (COORD_FILES, COORD_DIRS) if coordinator else (AGENT_FILES, AGENT_DIRS)
        translated = {}
        for sec, key in files + dirs:
            p = get(cfg, sec, key)
            if p is None:
                continue
            host, writable = to_host(p, table)
            if host is None or not os.path.exists(os.path.dirname(host) if (sec, key) in APPENDED else host):
                problem(f"compose: {name}: [{sec}] {key} = {p} is not in a mount or the image (host: {host})")
                continue
            if (sec, key) in dirs and not writable:
                problem(f"compose: {name}: [{sec}] {key} = {p} is mounted read-only")
            translated[(sec, key)] = host
        if not coordinator and sub == "run" and get(cfg, "tls", "auto_renew"):
            if not to_host(get(cfg, "tls", "cert"), table)[1]:
                problem(f"compose: {name}: [tls] auto_renew rewrites the certificate, but its directory is read-only")
        ok(f"compose: {name}: every path its config names is mounted from what prepare.sh made (or is in the image)")
        if coordinator:
            coord_listen = get(cfg, "server", "listen")
            lhost, lport = split_addr(coord_listen)
            published = [p for p in svc.get("ports", []) if p.endswith("/udp")]
            if lhost not in ("0.0.0.0", "::") or not any(p.split(":")[-1] == f"{lport}/udp" for p in published):
                problem(f"compose: {name}: [server] listen = {coord_listen}, published {published}")
            else:
                ok(f"compose: {name}: publishes UDP {lport}, which [server] listen = {coord_listen} binds")
        else:
            chost, cport = split_addr(get(cfg, "coordinator", "address"))
            if coord_listen is None or chost not in services or cport != split_addr(coord_listen)[1]:
                problem(f"compose: {name}: [coordinator] address = {chost}:{cport} is not the coordinator service's port")
            if get(cfg, "coordinator", "server_name") != chost:
                problem(f"compose: {name}: server_name is not {chost}, the name prepare.sh's certificate carries")
        bind = bind_of(cfg, binary, sub)
        test = svc.get("healthcheck", {}).get("test")
        probe = None
        if not test:
            problem(f"compose: {name}: no health check")
        elif test[0] == "CMD-SHELL":
            check_probe(f"compose: {name}", "sh -c (CMD-SHELL)", ["sh", "-c", test[1]], bind)
        else:
            check_probe(f"compose: {name}", None, test[1:], bind)
            probe = test[1:]
        # The same process on this host: container paths replaced by the prepared files.
        text = open(cfg_host).read()
        for (sec, key), host in translated.items():
            text = text.replace(f'"{get(cfg, sec, key)}"', json.dumps(host), 1)
        if not coordinator:
            text = text.replace(f'"{get(cfg, "coordinator", "address")}"', f'"127.0.0.1:{cport}"', 1)
        for port in re.findall(r'(?m)^\w+ = "[^"]*:(\d+)"', text):
            ports.setdefault(port, str(free_port(port == str(split_addr(coord_listen)[1]))))
        text = re.sub(r'(?m)^(\w+ = "[^"]*:)(\d+)"', lambda m: f'{m.group(1)}{ports[m.group(2)]}"', text)
        if probe:
            probe = [re.sub(r"/dev/tcp/([^/]+)/(\d+)", lambda m: f"/dev/tcp/{m.group(1)}/{ports[m.group(2)]}", w) for w in probe]
        out = os.path.join(mirror, f"host-{name}.toml")
        open(out, "w").write(text)
        bound = split_addr(bind)[1]
        plan.append({"name": name, "binary": binary, "sub": sub, "config": out, "probe": probe,
                     "port": ports[str(bound)], "config_port": bound})
    json.dump(plan, open(plan_path, "w"), indent=1)


def free_port(udp):
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# The fields each kind may have at the levels these manifests use (a subset of the API's
# schema: an unknown or misspelt field is an error, as with `kubectl --validate=strict`).
SCHEMA = {
    "PersistentVolumeClaim": {"spec": {"accessModes", "resources", "storageClassName", "volumeMode"}},
    "StatefulSet": {"spec": {"serviceName", "replicas", "selector", "template", "volumeClaimTemplates",
                             "podManagementPolicy", "updateStrategy"}},
    "Service": {"spec": {"type", "selector", "ports", "clusterIP"}},
}
API = {"PersistentVolumeClaim": "v1", "StatefulSet": "apps/v1", "Service": "v1"}
POD = {"securityContext", "terminationGracePeriodSeconds", "initContainers", "containers", "volumes"}
CONTAINER = {"name", "image", "command", "args", "ports", "readinessProbe", "livenessProbe", "startupProbe",
             "resources", "volumeMounts", "env"}
PROBE_KEYS = {"exec", "httpGet", "tcpSocket", "grpc", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
              "failureThreshold", "successThreshold"}
MOUNT = {"name", "mountPath", "subPath", "readOnly"}
VOLUME_KINDS = {"configMap", "secret", "persistentVolumeClaim", "emptyDir", "projected"}


def unknown(where, obj, allowed):
    for k in obj:
        if k not in allowed:
            problem(f"{where}: unknown field {k!r}")


def seeded_files(vol):
    """Relative path -> source, of a projected volume (or None for other volumes)."""
    if "projected" not in vol:
        return None
    files = {}
    for src in vol["projected"]["sources"]:
        (kind, ref), = src.items()
        if not ref.get("items"):
            problem(f"k8s: volume {vol['name']}: {kind} {ref.get('name')} without items: every key must be named")
        for item in ref.get("items", []):
            files[item["path"]] = f"{kind} {ref['name']} key {item['key']}"
    return files


def check_k8s():
    manifests = {"coordinator.yaml": ("coordinator", "fedward-coordinator", "serve"),
                 "agent.yaml": ("agent", None, None)}
    for fname, (cfg_kind, _, _) in manifests.items():
        docs = [d for d in yaml.safe_load_all(open(os.path.join(ROOT, "deploy", "k8s", fname))) if d]
        cfg = example(cfg_kind)
        by_kind = {}
        for d in docs:
            kind = d.get("kind")
            where = f"k8s {fname}: {kind} {d.get('metadata', {}).get('name')}"
            if kind not in API or d.get("apiVersion") != API[kind]:
                problem(f"{where}: apiVersion {d.get('apiVersion')} for kind {kind}")
                continue
            unknown(where, d, {"apiVersion", "kind", "metadata", "spec"})
            unknown(where, d["spec"], SCHEMA[kind]["spec"])
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"].get("name", "")):
                problem(f"{where}: metadata.name is not a DNS label")
            by_kind.setdefault(kind, []).append(d)
        claims = {c["metadata"]["name"] for c in by_kind.get("PersistentVolumeClaim", [])}
        for sts in by_kind.get("StatefulSet", []):
            where = f"k8s {fname}: StatefulSet {sts['metadata']['name']}"
            spec = sts["spec"]
            if spec.get("replicas") != 1:
                problem(f"{where}: one process per state directory: replicas must be 1")
            tmpl = spec["template"]
            labels = tmpl["metadata"].get("labels", {})
            if any(labels.get(k) != v for k, v in spec["selector"]["matchLabels"].items()):
                problem(f"{where}: the selector does not match the template's labels")
            pod = tmpl["spec"]
            unknown(where, pod, POD)
            sc = pod.get("securityContext", {})
            if not sc.get("runAsNonRoot") or sc.get("runAsUser") != 10001:
                problem(f"{where}: must run as the image's user 10001, non-root")
            volumes = {v["name"]: v for v in pod["volumes"]}
            for v in pod["volumes"]:
                kinds = VOLUME_KINDS & set(v)
                if len(kinds) != 1 or set(v) - VOLUME_KINDS - {"name"}:
                    problem(f"{where}: volume {v['name']}: one of {sorted(VOLUME_KINDS)} expected")
                if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in claims:
                    problem(f"{where}: volume {v['name']}: no PersistentVolumeClaim {v['persistentVolumeClaim']['claimName']} in {fname}")
                if "secret" in v and "key" in v["name"]:
                    pass
            containers = pod["containers"]
            # The keys: Secrets reach the processes only through an init container's 0600
            # copy (the binaries refuse keys that group or others may read).
            inits = pod.get("initContainers", [])
            seeded = {}
            for init in inits:
                unknown(f"{where}: init {init['name']}", init, CONTAINER)
                seed = next((m for m in init["volumeMounts"] if m["mountPath"] == "/seed"), None)
                target = next((m for m in init["volumeMounts"] if m["mountPath"] != "/seed"), None)
                cmd = " ".join(init.get("command", []))
                if not seed or not target or "chmod" not in cmd or "cp -" not in cmd:
                    problem(f"{where}: init {init['name']} must copy /seed and chmod the keys")
                    continue
                files = seeded_files(volumes[seed["name"]])
                dest = re.search(r"cp -\w+ /seed/\* (\S+?)/?( |$)", cmd).group(1)
                seeded[(target["name"], dest)] = files
            for c in containers:
                cw = f"{where}: container {c['name']}"
                unknown(cw, c, CONTAINER)
                argv = c.get("command", ["/usr/local/bin/fedward-coordinator"]) + c.get("args", [])
                binary, sub = os.path.basename(argv[0]), argv[1]
                cfg_path = argv[argv.index("--config") + 1]
                mounts = c["volumeMounts"]
                for m in mounts:
                    unknown(cw, m, MOUNT)
                    if m["name"] not in volumes:
                        problem(f"{cw}: mounts {m['name']}, which is not a volume")
                # Where each path of the config comes from.
                def source(path):
                    best = None
                    for m in mounts:
                        mp = m["mountPath"]
                        if path == mp or path.startswith(mp.rstrip("/") + "/"):
                            if best is None or len(mp) > len(best["mountPath"]):
                                best = m
                    for img in IMAGE_FILES:
                        if path.startswith(img + "/") and best is None:
                            return "the image", True
                    if best is None:
                        return None, False
                    vol = volumes[best["name"]]
                    rel = path[len(best["mountPath"]):].lstrip("/")
                    if "subPath" in best:
                        rel = os.path.join(best["subPath"], rel) if rel else best["subPath"]
                    for (vname, dest), files in seeded.items():
                        if vname == best["name"]:
                            if "emptyDir" in vol:
                                r = os.path.relpath(path, dest)
                                return (files.get(r), not best.get("readOnly", False))
                            # A persistent volume the init seeds under dest.
                            droot = next(m["mountPath"] for i in inits for m in i["volumeMounts"] if m["name"] == vname)
                            r = os.path.relpath(os.path.join(droot, rel), dest)
                            if not r.startswith(".."):
                                return (files.get(r), not best.get("readOnly", False))
                    if "configMap" in vol:
                        return f"configMap {vol['configMap']['name']} key {rel}", False
                    if "persistentVolumeClaim" in vol:
                        return f"persistent volume {vol['persistentVolumeClaim']['claimName']}", not best.get("readOnly", False)
                    return f"volume {best['name']}", not best.get("readOnly", False)
                src, _ = source(cfg_path)
                if not src:
                    problem(f"{cw}: its config {cfg_path} comes from no volume")
                coordinator = binary == "fedward-coordinator"
                files, dirs = (COORD_FILES, COORD_DIRS) if coordinator else (AGENT_FILES, AGENT_DIRS)
                for sec, key in files + dirs:
                    p = get(cfg, sec, key)
                    if p is None:
                        continue
                    src, writable = source(p)
                    if not src:
                        problem(f"{cw}: [{sec}] {key} = {p} comes from no volume, seeded key or the image")
                    elif (sec, key) in dirs and not src.startswith("persistent volume"):
                        problem(f"{cw}: [{sec}] {key} = {p} is on {src}, not a persistent volume")
                    elif (sec, key) in dirs and not writable:
                        problem(f"{cw}: [{sec}] {key} = {p} is mounted read-only")
                    elif key in ("key", "issuing_key", "signing_key", "tokens") and not src.startswith("secret"):
                        problem(f"{cw}: [{sec}] {key} = {p} comes from {src}, not a Secret")
                if sub == "run" and get(cfg, "tls", "auto_renew") and not source(get(cfg, "tls", "cert"))[1]:
                    problem(f"{cw}: [tls] auto_renew rewrites {get(cfg, 'tls', 'cert')}, which is read-only here")
                ok(f"{cw}: every path deploy/config/{cfg_kind}.toml names comes from a Secret (0600 copy), the "
                   f"ConfigMap, the persistent volume or the image; the state directory is on the persistent volume")
                # Ports: what the config binds off loopback is a containerPort; probes reach
                # loopback binds from inside the pod.
                ports = c.get("ports", [])
                if coordinator:
                    lhost, lport = split_addr(get(cfg, "server", "listen"))
                    if not any(p["containerPort"] == lport and p.get("protocol") == "UDP" for p in ports):
                        problem(f"{cw}: [server] listen port {lport}/UDP is not a containerPort")
                    for svc in by_kind.get("Service", []):
                        for sp in svc["spec"]["ports"]:
                            tp = sp["targetPort"]
                            target = next((p for p in ports if p.get("name") == tp or p["containerPort"] == tp), None)
                            if not target or sp.get("protocol") != target.get("protocol"):
                                problem(f"k8s {fname}: Service port {sp} targets no container port with its protocol")
                    ok(f"{cw}: UDP {lport} ([server] listen) is the containerPort the Service targets")
                bind = bind_of(cfg, binary, sub)
                bhost, _ = split_addr(bind)
                probes = [(k, c[k]) for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c]
                if not probes:
                    problem(f"{cw}: no probe")
                for k, pr in probes:
                    unknown(f"{cw}: {k}", pr, PROBE_KEYS)
                    handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in pr]
                    if len(handlers) != 1:
                        problem(f"{cw}: {k} needs exactly one handler, has {handlers}")
                    elif handlers[0] != "exec":
                        if is_loopback(bhost):
                            problem(f"{cw}: {k} is {handlers[0]}, which the kubelet sends to the pod's address, "
                                    f"but the config binds {bind}")
                    else:
                        check_probe(f"{cw}: {k}", None, pr["exec"]["command"], bind)


def main():
    what = sys.argv[1]
    print(f"{what}:")
    if what == "systemd":
        check_systemd()
    elif what == "compose":
        check_compose(sys.argv[2], sys.argv[3])
    elif what == "k8s":
        check_k8s()
    else:
        sys.exit(f"unknown check {what}")
    for p in PROBLEMS:
        print(f"  PROBLEM: {p}")
    sys.exit(1 if PROBLEMS else 0)


if __name__ == "__main__":
    main()
