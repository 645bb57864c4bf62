//! Tidy checks on the workspace's shape, from the build's own facts: which crate of ours
//! may depend on which (`cargo metadata`), which outside crates a crate must never link
//! (through any path), and no circle of modules inside a crate.
//!
//! The rules are the house rules of `ARCHITECTURE.md`: `fedward-shared` is pure (no async
//! runtime, no network stack, no ML framework, no crate of ours); `fedward-corpus` builds
//! without candle; the coordinator sees tensors as named f32 buffers and never links
//! candle; nothing depends on a binary crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Each crate of ours, and the crates of ours it may depend on (any kind of dependency).
/// A new crate must be placed here deliberately: an unlisted member fails the check.
const ALLOWED_EDGES: &[(&str, &[&str])] = &[
    ("fedward-shared", &[]),
    ("fedward-net", &["fedward-shared"]),
    ("fedward-corpus", &["fedward-shared"]),
    ("fedward-models", &["fedward-shared", "fedward-corpus"]),
    ("fedward-agent", &["fedward-shared", "fedward-net", "fedward-corpus", "fedward-models"]),
    ("fedward-coordinator", &["fedward-shared", "fedward-net"]),
    // The demo drives the real binaries as processes; it links neither.
    ("fedward-demo", &["fedward-shared", "fedward-corpus", "fedward-models"]),
    // Tests only: the one crate that may reach into the binaries' libraries.
    ("fedward-tests", &["fedward-shared", "fedward-net", "fedward-corpus", "fedward-models", "fedward-agent", "fedward-coordinator"]),
];

const ML_STACK: &[&str] = &["candle-core", "candle-nn", "candle-transformers", "tokenizers"];
const ASYNC_NET: &[&str] = &["tokio", "quinn", "quinn-proto", "axum", "hyper"];

/// Outside crates a crate of ours must not link, directly or through any other crate.
fn forbidden(krate: &str) -> Vec<&'static str> {
    match krate {
        "fedward-shared" => [ML_STACK, ASYNC_NET].concat(),
        "fedward-corpus" => [ML_STACK, ASYNC_NET].concat(),
        "fedward-net" | "fedward-coordinator" => ML_STACK.to_vec(),
        _ => Vec::new(),
    }
}

struct Package {
    name: String,
    /// Whether the package has a library target (others are binaries only).
    has_lib: bool,
    /// The root file of its library target, if any.
    lib_root: Option<PathBuf>,
}

struct Workspace {
    packages: BTreeMap<String, Package>,
    members: BTreeSet<String>,
    /// Package id -> (dependency package id, kinds: "normal", "dev", "build").
    deps: BTreeMap<String, Vec<(String, BTreeSet<String>)>>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace root").to_path_buf()
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("rustc -vV runs");
    let text = String::from_utf8(out.stdout).expect("rustc -vV prints UTF-8");
    text.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_owned()
}

/// `cargo metadata` for this host (offline: the test build has every package it names).
fn metadata() -> Workspace {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform"])
        .arg(host_triple())
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");

    let mut packages = BTreeMap::new();
    for p in json["packages"].as_array().expect("packages") {
        let targets = p["targets"].as_array().expect("targets");
        let lib = targets.iter().find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "lib" || k == "rlib")));
        packages.insert(
            p["id"].as_str().expect("id").to_owned(),
            Package {
                name: p["name"].as_str().expect("name").to_owned(),
                has_lib: lib.is_some(),
                lib_root: lib.map(|t| PathBuf::from(t["src_path"].as_str().expect("src_path"))),
            },
        );
    }
    let members = json["workspace_members"].as_array().expect("members").iter().map(|m| m.as_str().expect("id").to_owned()).collect();
    let mut deps = BTreeMap::new();
    for node in json["resolve"]["nodes"].as_array().expect("resolve") {
        let edges = node["deps"]
            .as_array()
            .expect("deps")
            .iter()
            .map(|d| {
                let kinds = d["dep_kinds"]
                    .as_array()
                    .expect("dep_kinds")
                    .iter()
                    .map(|k| k["kind"].as_str().unwrap_or("normal").to_owned())
                    .collect();
                (d["pkg"].as_str().expect("pkg").to_owned(), kinds)
            })
            .collect();
        deps.insert(node["id"].as_str().expect("id").to_owned(), edges);
    }
    Workspace { packages, members, deps }
}

impl Workspace {
    fn name(&self, id: &str) -> &str {
        &self.packages[id].name
    }

    fn member_id(&self, name: &str) -> Option<&str> {
        self.members.iter().find(|id| self.name(id) == name).map(String::as_str)
    }

    /// Every package a member links: its own dependencies of any kind but dev (and, with
    /// `with_dev`, its dev-dependencies too), then theirs, transitively. Returns each with
    /// the path that reaches it.
    fn reachable(&self, from: &str, with_dev: bool) -> BTreeMap<String, Vec<String>> {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut queue = vec![(from.to_owned(), vec![self.name(from).to_owned()])];
        while let Some((id, path)) = queue.pop() {
            for (dep, kinds) in &self.deps[&id] {
                let links = kinds.iter().any(|k| k != "dev") || (with_dev && id == from);
                if !links || seen.contains_key(dep) {
                    continue;
                }
                let mut p = path.clone();
                p.push(self.name(dep).to_owned());
                seen.insert(dep.clone(), p.clone());
                queue.push((dep.clone(), p));
            }
        }
        seen
    }
}

#[test]
fn crates_of_ours_depend_only_along_the_allowed_edges() {
    let ws = metadata();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED_EDGES.iter().copied().collect();
    let ours: BTreeSet<&str> = ws.members.iter().map(|id| ws.name(id)).collect();
    let mut problems = Vec::new();
    for name in &ours {
        if !allowed.contains_key(name) {
            problems.push(format!("{name} is a workspace member without a place in ALLOWED_EDGES (tests/tidy/main.rs)"));
        }
    }
    for id in &ws.members {
        let name = ws.name(id);
        let Some(may) = allowed.get(name) else { continue };
        for (dep, kinds) in &ws.deps[id] {
            let dep_name = ws.name(dep);
            if ours.contains(dep_name) && !may.contains(&dep_name) {
                let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
                problems.push(format!("{name} depends on {dep_name} ({}): not an allowed edge", kinds.join(", ")));
            }
        }
    }
    assert!(problems.is_empty(), "dependency rules broken:\n  {}", problems.join("\n  "));
}

#[test]
fn nothing_depends_on_a_binary_crate() {
    let ws = metadata();
    let mut problems = Vec::new();
    for id in &ws.members {
        for (dep, _) in &ws.deps[id] {
            if ws.members.contains(dep) && !ws.packages[dep].has_lib {
                problems.push(format!("{} depends on {}, a binary crate", ws.name(id), ws.name(dep)));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn pure_crates_never_link_the_ml_stack_or_the_async_network_stack() {
    let ws = metadata();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, _) in ALLOWED_EDGES {
        let banned = forbidden(name);
        if banned.is_empty() {
            continue;
        }
        let id = ws.member_id(name).unwrap_or_else(|| panic!("{name} is not a workspace member"));
        checked += 1;
        // Dev-dependencies count too: `cargo test -p fedward-corpus` must not build candle.
        for (dep, path) in ws.reachable(id, true) {
            if banned.contains(&ws.name(&dep)) {
                problems.push(format!("{name} links {}: {}", ws.name(&dep), path.join(" -> ")));
            }
        }
    }
    assert_eq!(checked, 4, "shared, corpus, net and coordinator are all checked");
    assert!(problems.is_empty(), "forbidden dependencies:\n  {}", problems.join("\n  "));
}

#[test]
fn no_circle_of_modules_inside_a_crate() {
    let ws = metadata();
    let mut problems = Vec::new();
    for id in &ws.members {
        let Some(root) = &ws.packages[id].lib_root else { continue };
        let graph = module_graph(root);
        for cycle in cycles(&graph) {
            let evidence: Vec<String> = cycle
                .iter()
                .flat_map(|m| graph[m].iter().filter(|(to, _)| cycle.contains(to)).map(move |(to, file)| format!("{m} -> {to} ({file})")))
                .collect();
            problems.push(format!("{}: modules {} use each other: {}", ws.name(id), cycle.join(", "), evidence.join("; ")));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let root = workspace_root();
    let mut missing = Vec::new();
    for dir in ["shared", "models", "agent", "coordinator", "tests", "deploy"] {
        for file in rust_files(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).expect("readable source");
            if !text.starts_with("//!") {
                missing.push(file.strip_prefix(&root).unwrap_or(&file).display().to_string());
            }
        }
    }
    assert!(missing.is_empty(), "files without a leading //! line: {}", missing.join(", "));
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                out.extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The crate's top-level modules and, for each, the other top-level modules its non-test
/// code names (with a file that names it).
fn module_graph(lib_root: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let dir = lib_root.parent().expect("src dir");
    let root_text = code_only(&std::fs::read_to_string(lib_root).expect("lib root"));
    let modules: BTreeSet<String> = top_level_modules(&root_text);
    let mut graph = BTreeMap::new();
    for module in &modules {
        let mut files: Vec<(PathBuf, usize)> = Vec::new();
        let single = dir.join(format!("{module}.rs"));
        if single.exists() {
            files.push((single, 1));
        }
        let nested = dir.join(module);
        for f in rust_files(&nested) {
            // mod.rs is the module itself; other files sit one level further down per folder.
            let below = f.strip_prefix(&nested).expect("below").components().count();
            let depth = if f.file_name().is_some_and(|n| n == "mod.rs") { below } else { below + 1 };
            files.push((f, depth));
        }
        let mut uses = BTreeMap::new();
        for (file, depth) in files {
            let code = without_test_modules(&code_only(&std::fs::read_to_string(&file).expect("module source")));
            for target in named_modules(&code, depth) {
                if modules.contains(&target) && &target != module {
                    let shown = file.strip_prefix(dir).unwrap_or(&file).display().to_string();
                    uses.entry(target).or_insert(shown);
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

fn top_level_modules(root: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for statement in root.split(';') {
        let words: Vec<&str> = statement.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "mod") {
            if i + 2 == words.len() {
                out.insert(words[i + 1].to_owned());
            }
        }
    }
    out
}

/// Top-level modules named by `crate::x`, `crate::{x, y::z}` or, `depth` levels down,
/// `super::...::x`.
fn named_modules(code: &str, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let crate_root = "super::".repeat(depth);
    for prefix in ["crate::", crate_root.as_str()] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + prefix.len()..];
            // `super::super::x` at depth 1 must not also count as `super::x` one level up.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = matching_brace(group);
                let mut level = 0;
                let mut item = String::new();
                for c in group[..end].chars().chain([',']) {
                    match c {
                        '{' => level += 1,
                        '}' => level -= 1,
                        ',' if level == 0 => {
                            out.extend(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if level == 0 {
                        item.push(c);
                    }
                }
            } else {
                out.extend(first_segment(rest));
            }
        }
    }
    out.remove("self");
    out.remove("super");
    out
}

fn first_segment(s: &str) -> Option<String> {
    let ident: String = s.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!ident.is_empty()).then_some(ident)
}

/// Index of the `}` closing a group whose `{` was just consumed.
fn matching_brace(s: &str) -> usize {
    let mut level = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => level += 1,
            '}' => {
                level -= 1;
                if level == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// The code with comments removed and the contents of string and char literals blanked,
/// so that neither a doc link nor a brace in a format string counts.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if src[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if src[i..].starts_with("/*") {
            let mut level = 0;
            while i < b.len() {
                if src[i..].starts_with("/*") {
                    level += 1;
                    i += 2;
                } else if src[i..].starts_with("*/") {
                    level -= 1;
                    i += 2;
                    if level == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if let Some(hashes) = raw_string_start(&src[i..]) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            let end = src[body..].find(&close).map_or(b.len(), |e| body + e + close.len());
            out.push_str("\"\"");
            i = end;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let rest = &src[i + 1..];
            let len = if rest.starts_with('\\') {
                rest.find('\'').map(|e| e + 1)
            } else {
                rest.chars().next().filter(|ch| rest[ch.len_utf8()..].starts_with('\'')).map(|ch| ch.len_utf8() + 1)
            };
            match len {
                Some(n) => {
                    out.push_str("' '");
                    i += 1 + n;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn raw_string_start(s: &str) -> Option<usize> {
    let rest = s.strip_prefix("br").or_else(|| s.strip_prefix('r'))?;
    let hashes = rest.chars().take_while(|c| *c == '#').count();
    rest[hashes..].starts_with('"').then_some(hashes + usize::from(s.starts_with("br")))
}

/// The code without `#[cfg(test)] mod name { ... }` blocks: tests may reach anywhere.
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = rest[at + "#[cfg(test)]".len()..].trim_start();
        let is_module = after.starts_with("mod ") || after.starts_with("pub mod ") || after.starts_with("pub(crate) mod ");
        match after.find(['{', ';']) {
            Some(open) if is_module && after.as_bytes()[open] == b'{' => {
                let end = open + 1 + matching_brace(&after[open + 1..]);
                rest = after.get(end + 1..).unwrap_or("");
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// The circles of the graph (strongly connected sets of more than one module).
fn cycles(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    // Two modules are in one circle when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(m) = stack.pop() {
            for to in graph.get(&m).into_iter().flat_map(|e| e.keys()) {
                if seen.insert(to.clone()) {
                    stack.push(to.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|m| (m, reach(m))).collect();
    let mut found: Vec<Vec<String>> = Vec::new();
    for m in graph.keys() {
        if found.iter().any(|c| c.contains(m)) || !reaches[m].contains(m) {
            continue;
        }
        let circle: Vec<String> =
            graph.keys().filter(|o| *o == m || (reaches[m].contains(*o) && reaches[*o].contains(m))).cloned().collect();
        found.push(circle);
    }
    found
}

#[cfg(test)]
mod checks_of_the_checker {
    use super::*;

    #[test]
    fn finds_references_in_code_but_not_in_comments_strings_or_tests() {
        let src = r####"
//! See [`crate::doc_only`].
use crate::{wire::{self, Message}, dp};
use super::plan::Plan;
fn f() { let s = "crate::in_string {"; let c = '{'; let _: &'static str = s; crate::ledger::x(); }
#[cfg(test)]
mod tests { use crate::test_only; }
"####;
        let code = without_test_modules(&code_only(src));
        let named = named_modules(&code, 1);
        let expected: BTreeSet<String> = ["wire", "dp", "plan", "ledger"].iter().map(|s| s.to_string()).collect();
        assert_eq!(named, expected);
        // Two levels down, `super::x` is a sibling inside the module, not a crate module.
        assert_eq!(named_modules("use super::sibling; use super::super::top;", 2), ["top".to_string()].into());
    }

    #[test]
    fn finds_a_circle_and_names_its_members() {
        let edge = |to: &[&str]| to.iter().map(|t| (t.to_string(), "f.rs".to_string())).collect::<BTreeMap<_, _>>();
        let graph: BTreeMap<String, BTreeMap<String, String>> = [
            ("dp".to_string(), edge(&["wire"])),
            ("wire".to_string(), edge(&["plan"])),
            ("plan".to_string(), edge(&["dp"])),
            ("audit".to_string(), edge(&["dp"])),
        ]
        .into();
        assert_eq!(cycles(&graph), vec![vec!["dp".to_string(), "plan".to_string(), "wire".to_string()]]);
        let acyclic: BTreeMap<String, BTreeMap<String, String>> = [("a".to_string(), edge(&["b"])), ("b".to_string(), edge(&[]))].into();
        assert!(cycles(&acyclic).is_empty());
    }
}
