//! Stacked lower layers under a real overlay (root only; elsewhere it
//! prints why it skipped): through a random walk of tree changes (files
//! added, changed, removed, made executable; directories removed whole;
//! a file turned into a directory and back; symbolic links), every tree's
//! layer stack, mounted as an overlay, shows exactly that tree: no
//! whiteout, no stale file of a layer below.

#![allow(clippy::unwrap_used)] // a test fails loudly

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use shoal_task::cas::{Cas, Lowers};
use shoal_task::proto::{Node, TreeEntry};
use shoal_task::tree::hash;

/// What a tree shows: path → ("d", "") | ("f", content) | ("l", target).
type View = BTreeMap<PathBuf, (char, Vec<u8>)>;

fn mounted_view(stack: &[PathBuf], empty: &Path, mnt: &Path) -> View {
    let mut lower: Vec<String> = stack.iter().map(|p| p.display().to_string()).collect();
    lower.push(empty.display().to_string());
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t overlay shoal-test -o "lowerdir=$1" "$2" && tar -C "$2" -cf - ."#)
        .args(["sh", &lower.join(":"), &mnt.display().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "overlay of {lower:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut view = View::new();
    let mut ar = tar::Archive::new(&out.stdout[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().into_owned();
        let p: PathBuf = p.components().filter(|c| c.as_os_str() != ".").collect();
        if p.as_os_str().is_empty() {
            continue;
        }
        let kind = e.header().entry_type();
        let v = if kind.is_dir() {
            ('d', Vec::new())
        } else if kind.is_symlink() {
            let t = e.link_name().unwrap().unwrap().into_owned();
            ('l', t.into_os_string().into_encoded_bytes())
        } else if kind.is_file() {
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            ('f', b)
        } else {
            panic!(
                "{} shows as {kind:?} (a whiteout left visible?)",
                p.display()
            );
        };
        view.insert(p, v);
    }
    view
}

/// A tiny deterministic generator (xorshift), seeded.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn every_stack_shows_exactly_its_tree() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: mounting an overlay and making whiteouts need root here");
        return;
    }
    let d = std::env::temp_dir().join(format!("shoal-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    struct Clean(PathBuf);
    impl Drop for Clean {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _clean = Clean(d.clone());
    let (empty, mnt) = (d.join("empty"), d.join("mnt"));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let cas = Cas::open(&d.join("cas"), 1 << 30).unwrap();
    // (Evicted layers' directories become new layers'.)
    let lowers = Arc::new(Lowers::for_trees(&d.join("lowers"), 4, 8));
    // The tree as the submitter has it: path → node, plus contents.
    let mut files: BTreeMap<PathBuf, (char, Vec<u8>, u32)> = BTreeMap::new();
    for i in 0..30 {
        files.insert(
            format!("d{}/f{i}", i % 3).into(),
            ('f', format!("{i}").into_bytes(), 0o644),
        );
    }
    let mut rng = Rng(0x5eed_1234_abcd);
    let mut deepest = 0;
    let mut held = Vec::new();
    for step in 0..60u32 {
        if files.is_empty() {
            files.insert(
                format!("d0/again{step}").into(),
                ('f', b"again".to_vec(), 0o644),
            );
        } else if step > 0 {
            let keys: Vec<PathBuf> = files.keys().cloned().collect();
            let pick = keys[rng.next(keys.len())].clone();
            match rng.next(7) {
                0 | 1 => {
                    let p = PathBuf::from(format!("d{}/n{step}", rng.next(4)));
                    // A file where the directory should be goes first.
                    files.remove(p.parent().unwrap());
                    files.insert(p, ('f', format!("new {step}").into_bytes(), 0o644));
                }
                2 => {
                    if let Some(f) = files.get_mut(&pick) {
                        f.1 = format!("changed {step}").into_bytes();
                    }
                }
                3 => {
                    files.remove(&pick);
                }
                4 => {
                    // A whole directory goes.
                    let top = pick.components().next().unwrap().as_os_str().to_owned();
                    files.retain(|p, _| p.components().next().unwrap().as_os_str() != top);
                }
                5 => {
                    // A file becomes a directory, or a directory a file.
                    let top = PathBuf::from(pick.components().next().unwrap().as_os_str());
                    if files.contains_key(&top) {
                        files.remove(&top);
                        files.insert(top.join("inner"), ('f', b"inner".to_vec(), 0o644));
                    } else {
                        files.retain(|p, _| !p.starts_with(&top));
                        files.insert(top, ('f', format!("was a dir {step}").into_bytes(), 0o644));
                    }
                }
                _ => {
                    if rng.next(2) == 0 {
                        files.insert(format!("link{step}").into(), ('l', b"d0/f0".to_vec(), 0));
                    } else if let Some(f) = files.get_mut(&pick) {
                        f.2 = if f.2 == 0o644 { 0o755 } else { 0o644 };
                    }
                }
            }
        }
        // The manifest: directories before what they hold.
        let mut dirs = std::collections::BTreeSet::new();
        for p in files.keys() {
            for a in p.ancestors().skip(1) {
                if !a.as_os_str().is_empty() {
                    dirs.insert(a.to_owned());
                }
            }
        }
        let mut tree: Vec<TreeEntry> = dirs
            .iter()
            .map(|p| TreeEntry {
                path: p.clone(),
                node: Node::Dir { mode: 0o755 },
            })
            .collect();
        let mut want = View::new();
        for p in &dirs {
            want.insert(p.clone(), ('d', Vec::new()));
        }
        for (p, (kind, data, mode)) in &files {
            let node = if *kind == 'l' {
                Node::Symlink {
                    target: PathBuf::from(String::from_utf8(data.clone()).unwrap()),
                }
            } else {
                cas.put(&hash(data), data).unwrap();
                Node::File {
                    hash: hash(data),
                    mode: *mode,
                    size: data.len() as u64,
                }
            };
            tree.push(TreeEntry {
                path: p.clone(),
                node,
            });
            want.insert(p.clone(), (*kind, data.clone()));
        }
        tree.sort_by(|a, b| a.path.cmp(&b.path));
        let lower = lowers.get(&cas, &tree, None).unwrap();
        let stack = lower.stack();
        deepest = deepest.max(stack.len());
        assert_eq!(
            mounted_view(&stack, &empty, &mnt),
            want,
            "step {step}, stack {stack:?}"
        );
        // Some trees stay in use a while (a long task), others end.
        held.push(lower);
        if held.len() > 3 {
            held.remove(rng.next(held.len()));
        }
        lowers.evict();
    }
    assert!(deepest > 2, "the walk stacked layers (deepest {deepest})");
    // Whiteouts were links to the cache's one, and directories came back.
    use std::os::unix::fs::MetadataExt;
    let w = std::fs::symlink_metadata(d.join("cas/.whiteout")).expect("the cache's whiteout");
    assert!(w.nlink() > 1, "no whiteout linked to it");
    assert!(
        lowers.spares().is_some_and(|s| !s.is_empty()),
        "no spare kept"
    );
}
