//! `cargo xtask test lint`'s check that no crate's modules import each other
//! in a cycle (ARCHITECTURE.md: the modules of a crate form layers too).
//!
//! A module is a file under `src/` (a directory's files count as the
//! module they are under: `arch/x86_64.rs` is `arch`). An edge is a
//! `crate::name` path outside comments, to the module `name` or, when
//! `name` is an item the crate root re-exports, to the module it comes
//! from. The crate root itself only declares modules and re-exports: an
//! item defined in `lib.rs` and used by a module is reported too. Unit
//! tests (`#[cfg(test)] mod tests` at a file's end) are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::Result;

/// Check every crate under `crates/`.
pub(crate) fn check(root: &Path) -> Result {
    let mut problems = Vec::new();
    let mut crates: Vec<_> = std::fs::read_dir(root.join("crates"))
        .map_err(|e| format!("crates/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("src/lib.rs").is_file())
        .collect();
    crates.sort();
    for dir in &crates {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let modules = read_modules(&dir.join("src"))?;
        problems.extend(
            problems_of(&modules)
                .into_iter()
                .map(|p| format!("{name}: {p}")),
        );
    }
    if problems.is_empty() {
        eprintln!("xtask: no module import cycles in {} crates", crates.len());
        Ok(())
    } else {
        Err(format!("module imports:\n  {}", problems.join("\n  ")))
    }
}

/// Module name → the text of its files (comments removed); `lib` is the root.
fn read_modules(src: &Path) -> Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap_or(&path);
            let top = rel
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy());
            let module = match top.as_deref() {
                Some(t) => t.trim_end_matches(".rs").to_owned(),
                None => continue,
            };
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // A module's unit tests (at its end, by convention) may use
            // anything of the crate.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            out.entry(module)
                .or_default()
                .push_str(&strip_comments(code));
        }
    }
    Ok(out)
}

/// The text without `//` comments (doc comments included: intra-doc links
/// are not imports).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names each `crate::` path of `text` starts with (`crate::{a, b::c}`
/// gives `a` and `b`).
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::`, `my_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let mut level = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => level += 1,
                    '}' => level -= 1,
                    ',' if level == 0 => {
                        out.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// What the crate root re-exports: item name → module it comes from.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in lib.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.rsplit("::").next().unwrap_or(item);
            let name = name.rsplit(" as ").next().unwrap_or(name).trim();
            out.insert(name.to_owned(), module.trim().to_owned());
        }
    }
    out
}

fn problems_of(modules: &BTreeMap<String, String>) -> Vec<String> {
    let lib = modules.get("lib").map(String::as_str).unwrap_or_default();
    let reexported = reexports(lib);
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (module, text) in modules.iter().filter(|(m, _)| *m != "lib") {
        let targets = edges.entry(module).or_default();
        for name in crate_refs(text) {
            let target = if modules.contains_key(&name) {
                name
            } else if let Some(m) = reexported.get(&name) {
                m.clone()
            } else {
                problems.push(format!("{module} uses crate::{name}, defined in lib.rs"));
                continue;
            };
            if target != *module {
                targets.insert(target);
            }
        }
    }
    // A cycle: a module reaching itself.
    let mut reported = BTreeSet::new();
    for start in edges.keys() {
        if let Some(cycle) = path_back(&edges, start) {
            let key: BTreeSet<String> = cycle.iter().cloned().collect();
            if reported.insert(key) {
                problems.push(format!("import cycle: {}", cycle.join(" -> ")));
            }
        }
    }
    problems
}

/// A path of edges from `start` back to it, if any (depth first).
fn path_back(edges: &BTreeMap<&str, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in edges.get(node.as_str()).into_iter().flatten() {
            if next == start {
                let mut p = path.clone();
                p.push(start.to_owned());
                return Some(p);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(m, t)| (m.to_string(), strip_comments(t)))
            .collect()
    }

    #[test]
    fn paths_and_groups_are_found_outside_comments() {
        let refs = crate_refs(&strip_comments(
            "use crate::{a::X, b, c::{d, e}};\nlet x = crate::f::g();\n// crate::h\n$crate::i",
        ));
        assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["a", "b", "c", "f"]);
    }

    #[test]
    fn a_cycle_is_reported_through_reexports() {
        let m = modules(&[
            ("lib", "mod a; mod b; pub use b::Thing;"),
            ("a", "use crate::Thing;"),
            ("b", "use crate::a::f;"),
        ]);
        let p = problems_of(&m);
        assert_eq!(p, ["import cycle: a -> b -> a"]);
    }

    #[test]
    fn layers_are_fine_and_root_items_are_not() {
        let m = modules(&[
            ("lib", "mod a; mod b; pub struct Root;"),
            ("a", "use crate::b::f;"),
            ("b", "fn f() {}"),
        ]);
        assert!(problems_of(&m).is_empty());
        let m = modules(&[("lib", "pub struct Root;"), ("a", "use crate::Root;")]);
        assert_eq!(problems_of(&m), ["a uses crate::Root, defined in lib.rs"]);
    }
}
