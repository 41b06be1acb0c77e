//! The module graph of every crate of the workspace: no import cycles between modules, and the
//! sans-IO core imports nothing from the runtime (ARCHITECTURE.md, "One direction").
//!
//! A module is a top-level file of a crate's `src/` (`src/foo.rs` and everything under
//! `src/foo/`); the crate root (`lib.rs`, `main.rs`) is a module too. A dependency is any
//! `crate::name` path outside comments (in `use` lines, grouped `use crate::{a, b}` lists and
//! inline paths): a module name counts as itself, an item the root re-exports counts as the
//! module it comes from, anything else as the root. Unit-test files (`tests.rs`, `tests/`)
//! are left out: a test may reach anywhere.
//!
//! Run `cargo test --test it layers -- --nocapture` to print each crate's graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The sans-IO modules of the core crate: protocol logic driven by bytes and `Instant`s.
const SANS_IO: &[&str] = &[
    "codec",
    "msh",
    "ack",
    "connection",
    "timer",
    "proxy",
    "cidr",
    "outcome",
    "reason",
    "date",
    "limits",
];
/// The runtime modules of the core crate: threads, sockets, the clock.
const RUNTIME: &[&str] = &[
    "reactor",
    "server",
    "pool",
    "completion",
    "handler",
    "telemetry",
    "transport",
    "dispatch",
    "control",
];

/// Mutual imports other branches are removing (issue 17): `(crate, a, b)`. The test fails
/// on any cycle not explained by these, and on an entry that no longer exists, so the list
/// only shrinks.
const BEING_FIXED: &[(&str, &str, &str)] = &[];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to, or `None` for unit-test files.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let parts: Vec<_> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.iter().any(|p| p == "tests" || p == "tests.rs") {
        return None;
    }
    let first = parts[0].trim_end_matches(".rs").to_owned();
    Some(match first.as_str() {
        "lib" | "main" => "(root)".to_owned(),
        _ => first,
    })
}

/// Code without `//` comments (doc comments included) and without string literals' contents
/// being mistaken for paths (good enough: no string in this workspace spells `crate::`).
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(|line| match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    })
}

/// `pub use module::{a, b}` and `pub use module::a` in the crate root: item → module.
fn root_reexports(root: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code: String = code_lines(root).collect::<Vec<_>>().join("\n");
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt
            .strip_prefix("pub use ")
            .or_else(|| stmt.strip_prefix("pub(crate) use "))
        else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        if !modules.contains(module) {
            continue;
        }
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap_or(item).trim();
            let name = name.rsplit("::").next().unwrap_or(name);
            if !name.is_empty() && name != "self" {
                map.insert(name.to_owned(), module.to_owned());
            }
        }
    }
    map
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The module graph of the crate whose sources are in `src`.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let root = ["lib.rs", "main.rs"]
        .iter()
        .find_map(|r| fs::read_to_string(src.join(r)).ok())
        .unwrap_or_default();
    let reexports = root_reexports(&root, &modules);
    let resolve = |name: &str| -> String {
        if modules.contains(name) {
            name.to_owned()
        } else {
            reexports
                .get(name)
                .cloned()
                .unwrap_or_else(|| "(root)".to_owned())
        }
    };
    let mut g = Graph::new();
    for file in &files {
        let Some(from) = module_of(src, file) else {
            continue;
        };
        let text = fs::read_to_string(file).expect("read source");
        let deps = g.entry(from.clone()).or_default();
        let code: String = code_lines(&text).collect::<Vec<_>>().join("\n");
        if from == "(root)" {
            // The root names its modules without `crate::`: `config::load(...)`.
            for module in &modules {
                let pat = format!("{module}::");
                let mut hay = code.as_str();
                while let Some(at) = hay.find(&pat) {
                    let before = hay[..at].chars().next_back();
                    let line_start = hay[..at].rfind('\n').map_or(0, |n| n + 1);
                    let declared = hay[line_start..at].trim_start().starts_with("pub use")
                        || hay[line_start..at].trim_start().starts_with("use");
                    hay = &hay[at + pat.len()..];
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                        || declared
                    {
                        continue;
                    }
                    if *module != from {
                        deps.insert(module.clone());
                    }
                }
            }
        }
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            // `$crate::` and `mllp_reactor::crate::`-like suffixes are not this crate's paths.
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
            rest = after;
            if preceded {
                continue;
            }
            if let Some(group) = after.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level entry.
                let mut depth = 0;
                let mut start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => start = true,
                        c if start && (c.is_alphanumeric() || c == '_') => {
                            start = false;
                            let name = ident_at(&group[i..]);
                            let to = resolve(name);
                            if to != from {
                                deps.insert(to);
                            }
                        }
                        _ => {}
                    }
                }
                continue;
            }
            let name = ident_at(after);
            if name.is_empty() {
                continue;
            }
            let to = resolve(name);
            if to != from {
                deps.insert(to);
            }
        }
    }
    g
}

/// Every elementary cycle is too many to list; the strongly connected components with more than
/// one module (each holds at least one cycle) and the 2-cycles (mutual imports) say enough.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    // Tarjan's strongly connected components.
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Pairs of modules that import each other.
fn mutual(g: &Graph) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (a, deps) in g {
        for b in deps {
            if a < b && g.get(b).is_some_and(|d| d.contains(a)) {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

#[test]
fn no_import_cycle_in_any_crate() {
    let mut failures = Vec::new();
    for krate in ["src", "store/src", "cli/src"] {
        let g = graph(&workspace().join(krate));
        println!("{krate}:");
        for (m, deps) in &g {
            println!(
                "  {m} -> {}",
                deps.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let sccs = cycles(&g);
        let pairs = mutual(&g);
        println!("  mutual imports: {pairs:?}");
        println!("  cyclic groups: {sccs:?}");
        let known: Vec<(String, String)> = BEING_FIXED
            .iter()
            .filter(|(k, _, _)| *k == krate)
            .map(|(_, a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        for pair in &known {
            if !pairs.contains(pair) {
                failures.push(format!(
                    "{krate}: {pair:?} is fixed: drop it from BEING_FIXED"
                ));
            }
        }
        // Without the known pairs, is anything still cyclic?
        let mut pruned = g.clone();
        for (a, b) in &known {
            if let Some(deps) = pruned.get_mut(a) {
                deps.remove(b);
            }
        }
        let left = cycles(&pruned);
        if !left.is_empty() {
            failures.push(format!("{krate}: cyclic groups {left:?}, mutual {pairs:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "import cycles:\n{}",
        failures.join("\n")
    );
}

#[test]
fn sans_io_core_imports_nothing_from_the_runtime() {
    let g = graph(&workspace().join("src"));
    let mut wrong = Vec::new();
    for module in SANS_IO {
        for dep in g.get(*module).into_iter().flatten() {
            if RUNTIME.contains(&dep.as_str()) || dep == "(root)" {
                wrong.push(format!("{module} -> {dep}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "sans-IO module imports the runtime: {wrong:?}"
    );
}
