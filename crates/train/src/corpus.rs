//! The training corpus: every `.py` file under a root directory (for the
//! bundled model, the Python standard library), read as UTF-8, deduplicated by
//! content and split into train and validation by file.
//!
//! The split is a function of each file's content hash, so it does not depend
//! on paths, order or the machine; about one file in twenty is held out.
//! `corpus.tsv` records every file kept: its split, SHA-256, size and path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{io_err, Result};

/// Directories skipped under the root: packages installed into the
/// interpreter rather than shipped with it, and byte-code caches.
const SKIPPED_DIRS: &[&str] = &["site-packages", "dist-packages", "__pycache__"];

/// Held-out files: those whose hash's first byte is below this (13/256 ≈ 5%).
const VALID_BELOW: u8 = 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

/// One kept file.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path relative to the root, with `/` separators.
    pub path: String,
    pub sha256: String,
    pub text: String,
    pub split: Split,
}

/// What a collection kept and dropped.
#[derive(Debug, Default)]
pub struct Collected {
    pub files: Vec<SourceFile>,
    pub duplicates: usize,
    pub not_utf8: usize,
}

impl Collected {
    pub fn split(&self, split: Split) -> impl Iterator<Item = &SourceFile> {
        self.files.iter().filter(move |f| f.split == split)
    }

    /// The manifest: a header line, then `split \t sha256 \t bytes \t path`
    /// per file in path order.
    pub fn manifest(&self, root: &Path) -> String {
        let mut out = format!(
            "# blockserve corpus: .py files under {} ({} kept, {} duplicates and {} non-UTF-8 files dropped)\n",
            root.display(),
            self.files.len(),
            self.duplicates,
            self.not_utf8
        );
        for f in &self.files {
            out += &format!("{}\t{}\t{}\t{}\n", f.split.name(), f.sha256, f.text.len(), f.path);
        }
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err(&path))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() && !SKIPPED_DIRS.contains(&name.as_str()) {
            walk(&path, out)?;
        } else if kind.is_file() && name.ends_with(".py") {
            out.push(path);
        }
    }
    Ok(())
}

/// Collect the `.py` files under `root` (symlinks are not followed).
pub fn collect(root: &Path) -> Result<Collected> {
    let mut paths = Vec::new();
    walk(root, &mut paths)?;
    let mut rel: Vec<(String, PathBuf)> = paths.into_iter().map(|p| (p.strip_prefix(root).unwrap_or(&p).to_string_lossy().replace('\\', "/"), p)).collect();
    rel.sort();
    let mut seen = HashSet::new();
    let mut out = Collected::default();
    for (path, full) in rel {
        let bytes = std::fs::read(&full).map_err(io_err(&full))?;
        let Ok(text) = String::from_utf8(bytes) else {
            out.not_utf8 += 1;
            continue;
        };
        let digest = Sha256::digest(text.as_bytes());
        if !seen.insert(digest) {
            out.duplicates += 1;
            continue;
        }
        let split = if digest[0] < VALID_BELOW { Split::Valid } else { Split::Train };
        let sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
        out.files.push(SourceFile { path, sha256, text, split });
    }
    Ok(out)
}
