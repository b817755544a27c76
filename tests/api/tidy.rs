//! Architecture invariants that the source itself must keep, checked by
//! reading it (rust-analyzer's tidy tests are the model): the modules of
//! `src/` form no import cycle, and every module depends only on the layers
//! below it, as ARCHITECTURE.md states. Every `crate::`, `super::` and
//! `self::` path outside `#[cfg(test)]` code counts — `use` lines, grouped
//! imports, re-exports and paths written inline — except a module root's
//! paths into its own submodules (a parent composes its children; the
//! children's uses of the parent count).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The layers, top first. A file belongs to the first entry whose path
/// prefix it starts with; it may use files of its own layer entry (but no
/// cycle, checked separately) and of the entries below it, never above.
const LAYERS: &[(&str, &[&str])] = &[
    ("cli", &["main.rs", "cli/"]),
    ("app", &["app.rs", "reload.rs"]),
    ("config", &["config.rs"]),
    ("metrics", &["metrics.rs"]),
    ("api", &["api/"]),
    ("transport", &["transport.rs", "idle.rs", "tls.rs"]),
    (
        "service",
        &[
            "service/",
            "rotation/worker.rs",
            "rotation/brake.rs",
            "auth/authenticator.rs",
            "auth/live_tokens.rs",
        ],
    ),
    ("error", &["error.rs"]),
    ("store", &["store/"]),
    ("auth", &["auth/"]),
    ("model", &["keys.rs", "rotation/"]),
    ("crypto", &["crypto/"]),
    ("report", &["report.rs"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, relative to it.
fn files() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), &src(), &mut out);
    out.sort();
    out
}

/// The module path of a file: `service/replica/mod.rs` → service::replica.
fn module_of(file: &str) -> Vec<String> {
    let stem = file.trim_end_matches(".rs");
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The file a module path names: the longest prefix that is a file.
fn file_of(module: &[String], all: &BTreeSet<String>) -> Option<String> {
    (1..=module.len()).rev().find_map(|k| {
        let base = module[..k].join("/");
        [format!("{base}.rs"), format!("{base}/mod.rs")]
            .into_iter()
            .find(|f| all.contains(f))
    })
}

/// The source without comments and without the `#[cfg(test)]` items.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands a path that starts at `text` (right after `crate::` or
/// `super::`) into its leaf paths: `{a::B, c::{d, e}}` gives a::B, c::d, c::e.
fn expand(text: &str) -> Vec<Vec<String>> {
    fn path(s: &[u8], i: &mut usize) -> Vec<Vec<String>> {
        let mut prefix: Vec<String> = Vec::new();
        loop {
            skip_ws(s, i);
            if *i < s.len() && s[*i] == b'{' {
                *i += 1;
                let mut out = Vec::new();
                loop {
                    skip_ws(s, i);
                    if *i >= s.len() {
                        return out;
                    }
                    if s[*i] == b'}' {
                        *i += 1;
                        break;
                    }
                    if s[*i] == b',' {
                        *i += 1;
                        continue;
                    }
                    for tail in path(s, i) {
                        let mut full = prefix.clone();
                        full.extend(tail);
                        out.push(full);
                    }
                }
                return out;
            }
            let start = *i;
            while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_' || s[*i] == b'*')
            {
                *i += 1;
            }
            if *i == start {
                return vec![prefix];
            }
            prefix.push(String::from_utf8_lossy(&s[start..*i]).into_owned());
            if s[*i..].starts_with(b"::") {
                *i += 2;
            } else {
                return vec![prefix];
            }
        }
    }
    fn skip_ws(s: &[u8], i: &mut usize) {
        while *i < s.len() && s[*i].is_ascii_whitespace() {
            *i += 1;
        }
    }
    path(text.as_bytes(), &mut 0)
}

/// Every file each file depends on.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let all: BTreeSet<String> = files().into_iter().collect();
    let mut graph = BTreeMap::new();
    for file in &all {
        if file == "lib.rs" {
            continue; // declares the modules; uses nothing
        }
        let text = code(&std::fs::read_to_string(src().join(file)).unwrap());
        let here = module_of(file);
        let mut deps = BTreeSet::new();
        // `super` of a file module is its directory's module; of a
        // `mod.rs`, the module above it.
        let mut parent = here.clone();
        parent.pop();
        let mut roots = vec![
            ("crate::".to_owned(), Vec::new()),
            ("super::".to_owned(), parent),
            ("self::".to_owned(), here.clone()),
        ];
        // A path may also start at a child module this file declares
        // (`mod agent; pub use agent::ReplicaAgent;`).
        for line in text.lines() {
            let line = line
                .trim()
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ");
            if let Some(child) = line.strip_prefix("mod ").and_then(|l| l.strip_suffix(';')) {
                roots.push((format!("{child}::"), here.clone()));
            }
        }
        for (keyword, base) in roots {
            let keyword = keyword.as_str();
            let mut rest = text.as_str();
            while let Some(at) = rest.find(keyword) {
                let before = rest[..at].chars().last();
                rest = &rest[at + keyword.len()..];
                // `$crate::` in macros and longer words ending in `crate`.
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                    continue;
                }
                let child = !matches!(keyword, "crate::" | "super::" | "self::");
                for leaf in expand(rest) {
                    let mut module = base.clone();
                    if child {
                        module.push(keyword.trim_end_matches("::").to_owned());
                    }
                    module.extend(leaf);
                    if let Some(target) = file_of(&module, &all) {
                        // A module's root using or re-exporting its own
                        // submodules is composition, not a dependency
                        // back: only the submodules' uses of it count.
                        let own = module_of(&target).starts_with(&here) && !here.is_empty();
                        if &target != file && target != "lib.rs" && !own {
                            deps.insert(target);
                        }
                    }
                }
            }
        }
        graph.insert(file.clone(), deps);
    }
    graph
}

fn layer_of(file: &str) -> usize {
    LAYERS
        .iter()
        .position(|(_, prefixes)| prefixes.iter().any(|p| file.starts_with(p)))
        .unwrap_or_else(|| panic!("{file} is in no layer of tests/api/tidy.rs: add it"))
}

/// The edges that go up a layer.
fn upward_edges(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (file, deps) in graph {
        for dep in deps {
            if layer_of(dep) < layer_of(file) {
                bad.push(format!(
                    "{file} ({}) uses {dep} ({}), a layer above it",
                    LAYERS[layer_of(file)].0,
                    LAYERS[layer_of(dep)].0
                ));
            }
        }
    }
    bad
}

/// The import cycles (strongly connected components of more than one file).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then collect on the reversed graph.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(node.to_owned()) {
            return;
        }
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, seen, order);
        }
        order.push(node.to_owned());
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for node in graph.keys() {
        visit(node, graph, &mut seen, &mut order);
    }
    let mut reversed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, deps) in graph {
        for to in deps {
            reversed.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut components = Vec::new();
    for node in order.iter().rev() {
        if assigned.contains(node) {
            continue;
        }
        let mut component = Vec::new();
        let mut stack = vec![node.clone()];
        while let Some(n) = stack.pop() {
            if !assigned.insert(n.clone()) {
                continue;
            }
            component.push(n.clone());
            stack.extend(reversed.get(&n).into_iter().flatten().cloned());
        }
        if component.len() > 1 {
            component.sort();
            components.push(component);
        }
    }
    components
}

#[test]
fn paths_expand_like_rust_imports() {
    let leaves = expand("{a::B, c::{d, e::*}, f} rest");
    let joined: Vec<String> = leaves.iter().map(|p| p.join("::")).collect();
    assert_eq!(joined, ["a::B", "c::d", "c::e::*", "f"]);
    assert_eq!(expand("store::Store;")[0], ["store", "Store"]);
}

#[test]
fn the_checks_catch_a_back_edge_and_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("store/keys.rs".into(), ["service/admin.rs".into()].into());
    graph.insert("service/admin.rs".into(), ["store/keys.rs".into()].into());
    assert_eq!(upward_edges(&graph).len(), 1);
    assert_eq!(cycles(&graph).len(), 1);
}

#[test]
fn modules_form_no_cycle_and_depend_only_downward() {
    let graph = graph();
    assert!(graph.len() > 40, "only {} files read", graph.len());
    let cycles = cycles(&graph);
    let upward = upward_edges(&graph);
    assert!(
        cycles.is_empty() && upward.is_empty(),
        "import cycles:\n{}\nedges against the layering (ARCHITECTURE.md, *Dependency direction*):\n{}",
        cycles
            .iter()
            .map(|c| format!("  {}", c.join(" ↔ ")))
            .collect::<Vec<_>>()
            .join("\n"),
        upward
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
