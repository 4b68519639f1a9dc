//! The shape of the `mesh-node` library, as a specification: imports run one way and files stay
//! small enough to read whole.
//!
//! Each source file of the library is parsed (`syn`) and every path it names that starts with
//! `crate::`, `super::` or `self::` (in `use` items and in expressions, types and patterns alike)
//! is resolved to the file that defines its longest module prefix. Code under `#[cfg(test)]` and
//! test files are left out: a test may reach anywhere. An edge from a module to one of its own
//! children is left out too: the parent is the facade that declares and re-exports them. What is
//! left must have no cycle at all (Tarjan's strongly connected components), so a lower layer never
//! names a higher one, inside a folder or across folders.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Most code lines (not blank, not only a comment) a product file may have.
const MAX_CODE_LINES: usize = 600;

fn src_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-node/src")
}

/// A library module: its path from the crate root (`["proxy", "pool"]`) and its file.
#[derive(Debug)]
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Every file of the library crate (not the binaries under `src/bin/`), with its module path.
fn modules() -> Vec<Module> {
    let root = src_root();
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read the source directory") {
            let path = entry.expect("read a directory entry").path();
            let rel = path.strip_prefix(&root).expect("under the source root");
            if rel.starts_with("bin") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut parts: Vec<String> = rel
                    .with_extension("")
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                if parts == ["lib"] {
                    parts.clear();
                }
                out.push(Module {
                    path: parts,
                    file: path,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn is_test_file(module: &Module) -> bool {
    module.path.iter().any(|p| p == "tests")
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>().is_ok_and(|m| {
                m.path().is_ident("test")
                    || matches!(&m, syn::Meta::List(l) if l.tokens.to_string().contains("test"))
            })
    })
}

/// Collects the absolute module paths a file names, skipping `#[cfg(test)]` items.
struct Paths<'m> {
    /// The module the visitor is in (the file's, plus any inline `mod` it is inside).
    here: Vec<String>,
    /// The file's own module path.
    file: &'m [String],
    found: Vec<Vec<String>>,
}

impl Paths<'_> {
    /// `segments` as an absolute path, if it is relative to the crate (`crate`, `super`, `self`).
    fn absolute(&self, segments: &[String]) -> Option<Vec<String>> {
        let mut at = self.here.clone();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                at.clear();
                rest = &rest[1..];
            }
            Some("super" | "self") => {
                while let Some(first) = rest.first() {
                    match first.as_str() {
                        "super" => {
                            at.pop()?;
                        }
                        "self" => {}
                        _ => break,
                    }
                    rest = &rest[1..];
                }
            }
            _ => return None,
        }
        at.extend(rest.iter().cloned());
        Some(at)
    }

    fn record(&mut self, segments: Vec<String>) {
        if let Some(path) = self.absolute(&segments) {
            self.found.push(path);
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.record(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.record(full);
            }
            syn::UseTree::Glob(_) => self.record(prefix.clone()),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Macro(m) => &m.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if is_cfg_test(attrs) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, module: &'ast syn::ItemMod) {
        if module.content.is_some() {
            self.here.push(module.ident.to_string());
            syn::visit::visit_item_mod(self, module);
            self.here.pop();
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {
        // `pub(super)` and `pub(in crate::x)` name who may see an item, not what it uses.
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.record(segments);
        syn::visit::visit_path(self, path);
    }
}

/// The library's import graph: file index -> the file indices it names.
fn import_graph(modules: &[Module]) -> Vec<BTreeSet<usize>> {
    let index: BTreeMap<&[String], usize> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.path.as_slice(), i))
        .collect();
    modules
        .iter()
        .map(|module| {
            let mut edges = BTreeSet::new();
            if is_test_file(module) {
                return edges;
            }
            let text = fs::read_to_string(&module.file).expect("read a source file");
            let file =
                syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", module.file.display()));
            let mut paths = Paths {
                here: module.path.clone(),
                file: &module.path,
                found: Vec::new(),
            };
            paths.visit_file(&file);
            for mut target in paths.found {
                // The longest prefix that is a file of the library.
                let to = loop {
                    if let Some(&to) = index.get(target.as_slice()) {
                        break Some(to);
                    }
                    if target.pop().is_none() {
                        break None;
                    }
                };
                let Some(to) = to else { continue };
                let target = &modules[to];
                let own_child =
                    target.path.len() > paths.file.len() && target.path.starts_with(paths.file);
                if target.path != paths.file && !own_child && !is_test_file(target) {
                    edges.insert(to);
                }
            }
            edges
        })
        .collect()
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles(graph: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct Tarjan<'g> {
        graph: &'g [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.graph[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort_unstable();
                    self.out.push(component);
                }
            }
        }
    }
    let n = graph.len();
    let mut t = Tarjan {
        graph,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    t.out
}

fn display(module: &Module) -> String {
    if module.path.is_empty() {
        "lib".to_owned()
    } else {
        module.path.join("::")
    }
}

#[test]
fn imports_run_one_way() {
    let modules = modules();
    assert!(
        modules.len() > 50,
        "found only {} library files under {}",
        modules.len(),
        src_root().display()
    );
    let graph = import_graph(&modules);
    let found = cycles(&graph);
    let report: Vec<String> = found
        .iter()
        .map(|c| {
            c.iter()
                .map(|&i| display(&modules[i]))
                .collect::<Vec<_>>()
                .join(" <-> ")
        })
        .collect();
    assert!(
        report.is_empty(),
        "import cycles in mesh-node:\n  {}",
        report.join("\n  ")
    );
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // a -> b -> c -> a, and d -> a outside it.
    let graph = vec![
        BTreeSet::from([1]),
        BTreeSet::from([2]),
        BTreeSet::from([0]),
        BTreeSet::from([0]),
    ];
    assert_eq!(cycles(&graph), vec![vec![0, 1, 2]]);
    assert!(cycles(&[BTreeSet::from([1]), BTreeSet::new()]).is_empty());
}

/// Lines that are neither blank nor only a comment.
fn code_lines(text: &str) -> usize {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count()
}

#[test]
fn product_files_are_small_enough_to_read_whole() {
    let mut product = Vec::new();
    for dir in [
        "mesh-node/src",
        "mesh-common/src",
        "mesh-ebpf/src",
        "xtask/src",
    ] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("read a source directory") {
                let path = entry.expect("read a directory entry").path();
                if path.is_dir() {
                    if path.file_name().is_some_and(|n| n != "tests") {
                        stack.push(path);
                    }
                } else if path.extension().is_some_and(|e| e == "rs")
                    && path.file_name().is_some_and(|n| n != "tests.rs")
                {
                    product.push(path);
                }
            }
        }
    }
    assert!(product.len() > 50);
    let mut too_long: Vec<String> = product
        .iter()
        .filter_map(|path| {
            let lines = code_lines(&fs::read_to_string(path).expect("read a source file"));
            let shown = path
                .iter()
                .skip_while(|p| *p != "..")
                .skip(1)
                .collect::<PathBuf>();
            (lines > MAX_CODE_LINES).then(|| format!("{} ({lines} code lines)", shown.display()))
        })
        .collect();
    too_long.sort();
    assert!(
        too_long.is_empty(),
        "product files over {MAX_CODE_LINES} code lines (split them by concept):\n  {}",
        too_long.join("\n  ")
    );
}
