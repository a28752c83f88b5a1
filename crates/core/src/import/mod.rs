//! Training and evaluation datasets built from text that Debian ships, so that the recipe — not
//! the data — is what we distribute: anyone with the same package version gets the same bytes.
//!
//! # Contract
//!
//! * **Sources.** [`Source::Wordnet`] (package `wordnet-base`, `data.{noun,verb,adj,adv}`),
//!   [`Source::Foldoc`] (`dict-foldoc`, `foldoc.dict.dz` + `foldoc.index`) and
//!   [`Source::Manpages`] (`manpages` and `manpages-dev`, `man*/*.gz`). Each turns one *item*
//!   (a synset, a dictionary entry, a man page) into one query and one document, built so that
//!   the query's text is not inside the document (otherwise retrieval would be string matching):
//!   see each source's module.
//! * **Layout.** The output is a BEIR directory: `corpus.jsonl` (`{"_id","title","text"}`),
//!   `queries.jsonl` (`{"_id","text"}`), `qrels/{train,dev,test}.tsv` (header
//!   `query-id\tcorpus-id\tscore`, one line per item with score 1), and `<source>.json`, e.g.
//!   `wordnet.json` (source,
//!   Debian packages and versions, seed, item limit, counts per split, skip reasons, importer
//!   version). A query and its document share the item's id.
//! * **Splits.** By item: 80/10/10 (train/dev/test) by a SHA-256 of the seed and the item id,
//!   so an item's query and document are judged in exactly one split, and an item keeps its
//!   split when other items come or go (a new package version does not move test items into
//!   train). Every document is in the one corpus, as in BEIR.
//! * **Limit.** `max_items` keeps that many items chosen by another seeded hash of their ids
//!   (not the first N), before splitting, so a small import is a fair sample of the full one.
//! * **Determinism.** Items are written in source order (files sorted, entries as stored);
//!   nothing depends on hash-map order, time or paths, so the same package version and seed
//!   give identical bytes.
//! * **Duplicates.** An item whose query text (case-insensitive) equals an earlier item's is
//!   skipped: one query with two equally right documents, only one judged, would punish a
//!   correct retriever.
//! * **Atomicity.** Everything is written to a temporary directory beside `out` and renamed
//!   into place at the end; `out` must not exist.

mod foldoc;
mod manpages;
mod mask;
mod troff;
mod wordnet;

pub use mask::{contains_term, mask_terms};

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever a change to the parsing or splitting changes the output bytes, so a
/// `<source>.json` says which recipe made its dataset.
pub const IMPORTER_VERSION: u32 = 1;

/// A text source this module can import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// WordNet 3.0 synsets: query = gloss definition, document = lemmas + examples.
    Wordnet,
    /// FOLDOC entries: query = first paragraph (headword masked), document = the rest.
    Foldoc,
    /// Linux man pages: query = NAME one-liner (names masked), document = DESCRIPTION.
    Manpages,
}

impl Source {
    /// Every source, in the order the CLI lists them.
    pub const ALL: [Source; 3] = [Source::Wordnet, Source::Foldoc, Source::Manpages];

    /// The name used on the command line and in `<source>.json`.
    pub fn name(self) -> &'static str {
        match self {
            Source::Wordnet => "wordnet",
            Source::Foldoc => "foldoc",
            Source::Manpages => "manpages",
        }
    }

    /// The source named `name`, if any.
    pub fn from_name(name: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The Debian packages whose files this source reads.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Source::Wordnet => &["wordnet-base"],
            Source::Foldoc => &["dict-foldoc"],
            Source::Manpages => &["manpages", "manpages-dev"],
        }
    }

    /// Where Debian installs the data (the default `--from`).
    pub fn default_dir(self) -> &'static Path {
        Path::new(match self {
            Source::Wordnet => "/usr/share/wordnet",
            Source::Foldoc => "/usr/share/dictd",
            Source::Manpages => "/usr/share/man",
        })
    }

    /// How to install the data, for messages.
    pub fn install_hint(self) -> &'static str {
        match self {
            Source::Wordnet => "apt-get install wordnet-base",
            Source::Foldoc => {
                "apt-get install dict-foldoc, or `apt-get download dict-foldoc && dpkg-deb -x \
                 dict-foldoc_*.deb DIR` and pass DIR/usr/share/dictd"
            }
            Source::Manpages => "apt-get install manpages manpages-dev",
        }
    }

    /// A file whose presence shows the data is installed under `dir`.
    pub fn marker(self, dir: &Path) -> PathBuf {
        match self {
            Source::Wordnet => dir.join("data.noun"),
            Source::Foldoc => dir.join("foldoc.dict.dz"),
            Source::Manpages => dir.join("man3"),
        }
    }
}

/// One item: its query and its document, sharing `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Stable id, derived from the item's name in the source (not its position).
    pub id: String,
    /// The query text.
    pub query: String,
    /// The document title.
    pub title: String,
    /// The document text.
    pub text: String,
}

/// The items a source yielded, and how many it skipped for each reason.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Kept items, in source order.
    pub items: Vec<Item>,
    /// Skip reason → count.
    pub skipped: BTreeMap<String, usize>,
}

impl Parsed {
    fn skip(&mut self, why: &str) {
        *self.skipped.entry(why.to_string()).or_default() += 1;
    }
}

/// Why an import failed. Messages name the file (and line or entry) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A source file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The source data is not installed where it was looked for.
    #[error(
        "{}: no {} data here (expected {}); install it with: {hint}",
        dir.display(),
        kind.name(),
        kind.marker(dir).display()
    )]
    Missing {
        /// The source.
        kind: Source,
        /// The directory searched.
        dir: PathBuf,
        /// How to install it.
        hint: &'static str,
    },
    /// A record does not have the expected shape.
    #[error("{}: {at}: {problem}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Where in it: `line N` or `entry NAME`.
        at: String,
        /// What was expected.
        problem: String,
    },
    /// The output exists already.
    #[error("{}: already exists; refusing to overwrite (remove it or choose another --out)", path.display())]
    OutputExists {
        /// The output directory.
        path: PathBuf,
    },
    /// Writing the output failed.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The path being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing survived parsing and skipping.
    #[error("{}: {} yielded no usable item", dir.display(), kind.name())]
    Empty {
        /// The source.
        kind: Source,
        /// The directory read.
        dir: PathBuf,
    },
}

/// A split of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Split {
    /// 80 % of items.
    Train,
    /// 10 %.
    Dev,
    /// 10 %.
    Test,
}

impl Split {
    /// The qrels file stem.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

/// A seeded 64-bit hash of `id`, domain-separated by `purpose` so the selection and the split
/// are independent draws.
fn seeded_hash(purpose: &str, seed: u64, id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(purpose.as_bytes());
    h.update([0]);
    h.update(seed.to_le_bytes());
    h.update(id.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The split of item `id` under `seed`: buckets 0–7 of 10 train, 8 dev, 9 test.
pub fn split_of(id: &str, seed: u64) -> Split {
    match seeded_hash("split", seed, id) % 10 {
        0..=7 => Split::Train,
        8 => Split::Dev,
        _ => Split::Test,
    }
}

/// Keeps `max` items chosen by a seeded hash of their ids, in their original order.
pub fn select(items: Vec<Item>, max: Option<usize>, seed: u64) -> Vec<Item> {
    let Some(max) = max.filter(|&m| m < items.len()) else {
        return items;
    };
    let mut order: Vec<(u64, usize)> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (seeded_hash("select", seed, &it.id), i))
        .collect();
    order.sort_unstable();
    let keep: HashSet<usize> = order.into_iter().take(max).map(|(_, i)| i).collect();
    items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, it)| it)
        .collect()
}

/// Reads every item of `source` from `dir`, calling `progress(done, total)` as files are read.
pub fn read_source(
    source: Source,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Parsed, ImportError> {
    if !source.marker(dir).exists() {
        return Err(ImportError::Missing {
            kind: source,
            dir: dir.to_path_buf(),
            hint: source.install_hint(),
        });
    }
    let mut parsed = match source {
        Source::Wordnet => wordnet::read(dir)?,
        Source::Foldoc => foldoc::read(dir)?,
        Source::Manpages => manpages::read(dir, progress)?,
    };
    drop_duplicate_queries(&mut parsed);
    Ok(parsed)
}

fn drop_duplicate_queries(parsed: &mut Parsed) {
    let mut seen = HashSet::new();
    let before = parsed.items.len();
    parsed
        .items
        .retain(|it| seen.insert(it.query.to_lowercase()));
    let dropped = before - parsed.items.len();
    if dropped > 0 {
        *parsed
            .skipped
            .entry("query text duplicates an earlier item's".into())
            .or_default() += dropped;
    }
}

/// The version of Debian package `pkg` that shipped the data in `dir`: the first line of its
/// `changelog.Debian.gz` beside the data (`dir/../doc/PKG/`, which also works for an extracted
/// `.deb`), else `dpkg-query` when `dir` is the default install location, else `"unknown"`.
pub fn package_version(pkg: &str, dir: &Path, default_dir: &Path) -> String {
    let changelog = dir.join("../doc").join(pkg).join("changelog.Debian.gz");
    if let Some(v) = changelog_version(&changelog) {
        return v;
    }
    if dir == default_dir {
        if let Ok(out) = std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", pkg])
            .output()
        {
            let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !v.is_empty() {
                return v;
            }
        }
    }
    "unknown".into()
}

/// `pkg (VERSION) dist; urgency=...` → VERSION.
fn changelog_version(path: &Path) -> Option<String> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).ok()?;
    let mut first = String::new();
    std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file))
        .read_line(&mut first)
        .ok()?;
    let start = first.find('(')? + 1;
    let end = start + first[start..].find(')')?;
    Some(first[start..end].to_string())
}

/// A Debian package and its version, as recorded in `<source>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PackageVersion {
    /// Package name.
    pub name: String,
    /// Its version, or `"unknown"`.
    pub version: String,
}

/// Item counts, as recorded in `<source>.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Items written (queries = documents).
    pub items: usize,
    /// Items in `qrels/train.tsv`.
    pub train: usize,
    /// Items in `qrels/dev.tsv`.
    pub dev: usize,
    /// Items in `qrels/test.tsv`.
    pub test: usize,
}

/// The provenance written to `DIR/<source>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    /// Source name (`wordnet`, `foldoc`, `manpages`).
    pub source: String,
    /// The Debian packages read, with versions.
    pub packages: Vec<PackageVersion>,
    /// The split and selection seed.
    pub seed: u64,
    /// `--max-items`, if given.
    pub max_items: Option<usize>,
    /// Items the source yielded before `max_items` (after skips).
    pub available_items: usize,
    /// Items written, per split.
    pub counts: Counts,
    /// Skip reason → count.
    pub skipped: BTreeMap<String, usize>,
    /// [`IMPORTER_VERSION`].
    pub importer_version: u32,
}

/// What to import and where.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The source.
    pub source: Source,
    /// Where its data lies (see [`Source::default_dir`]).
    pub from: PathBuf,
    /// The output directory (must not exist).
    pub out: PathBuf,
    /// Seed for selection and splitting.
    pub seed: u64,
    /// Keep at most this many items (seeded choice).
    pub max_items: Option<usize>,
}

/// Runs an import end to end and returns what `<source>.json` records.
pub fn import(
    opts: &ImportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Provenance, ImportError> {
    // Checked first, so a wrong --out is refused before minutes of parsing.
    if opts.out.exists() {
        return Err(ImportError::OutputExists {
            path: opts.out.clone(),
        });
    }
    let parsed = read_source(opts.source, &opts.from, progress)?;
    let available = parsed.items.len();
    let items = select(parsed.items, opts.max_items, opts.seed);
    if items.is_empty() {
        return Err(ImportError::Empty {
            kind: opts.source,
            dir: opts.from.clone(),
        });
    }
    let packages = opts
        .source
        .packages()
        .iter()
        .map(|p| PackageVersion {
            name: p.to_string(),
            version: package_version(p, &opts.from, opts.source.default_dir()),
        })
        .collect();
    let mut prov = Provenance {
        source: opts.source.name().into(),
        packages,
        seed: opts.seed,
        max_items: opts.max_items,
        available_items: available,
        counts: Counts::default(),
        skipped: parsed.skipped,
        importer_version: IMPORTER_VERSION,
    };
    write_dataset(&items, &opts.out, opts.seed, &mut prov)?;
    Ok(prov)
}

/// Writes `items` as a BEIR directory at `out` (atomically), filling `prov.counts`.
pub fn write_dataset(
    items: &[Item],
    out: &Path,
    seed: u64,
    prov: &mut Provenance,
) -> Result<(), ImportError> {
    if out.exists() {
        return Err(ImportError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Write { path, source }
    };
    std::fs::create_dir_all(&parent).map_err(werr(&parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp"))
        .tempdir_in(&parent)
        .map_err(werr(&parent))?;
    let dir = tmp.path();
    std::fs::create_dir(dir.join("qrels")).map_err(werr(&dir.join("qrels")))?;

    #[derive(Serialize)]
    struct Doc<'a> {
        _id: &'a str,
        title: &'a str,
        text: &'a str,
    }
    #[derive(Serialize)]
    struct Query<'a> {
        _id: &'a str,
        text: &'a str,
    }
    let mut corpus = String::new();
    let mut queries = String::new();
    let mut qrels: BTreeMap<Split, String> = [Split::Train, Split::Dev, Split::Test]
        .into_iter()
        .map(|s| (s, "query-id\tcorpus-id\tscore\n".to_string()))
        .collect();
    let mut counts = Counts::default();
    for it in items {
        corpus.push_str(&json_line(&Doc {
            _id: &it.id,
            title: &it.title,
            text: &it.text,
        }));
        corpus.push('\n');
        queries.push_str(&json_line(&Query {
            _id: &it.id,
            text: &it.query,
        }));
        queries.push('\n');
        let split = split_of(&it.id, seed);
        qrels
            .get_mut(&split)
            .expect("every split")
            .push_str(&format!("{}\t{}\t1\n", it.id, it.id));
        counts.items += 1;
        match split {
            Split::Train => counts.train += 1,
            Split::Dev => counts.dev += 1,
            Split::Test => counts.test += 1,
        }
    }
    prov.counts = counts;
    let write = |rel: &str, text: &str| -> Result<(), ImportError> {
        let path = dir.join(rel);
        let mut f = std::fs::File::create(&path).map_err(werr(&path))?;
        f.write_all(text.as_bytes()).map_err(werr(&path))?;
        f.sync_all().map_err(werr(&path))
    };
    write("corpus.jsonl", &corpus)?;
    write("queries.jsonl", &queries)?;
    for (split, text) in &qrels {
        write(&format!("qrels/{}.tsv", split.name()), text)?;
    }
    let mut meta = serde_json::to_string_pretty(prov).expect("provenance serializes");
    meta.push('\n');
    write(&format!("{}.json", prov.source), &meta)?;
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|source| {
        let _ = std::fs::remove_dir_all(&kept);
        ImportError::Write {
            path: out.to_path_buf(),
            source,
        }
    })
}

fn json_line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

/// Collapses runs of whitespace to one space and trims.
pub(crate) fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Words with at least one letter or digit (what "under N words" counts), masks excluded.
pub(crate) fn word_count(s: &str) -> usize {
    s.split_whitespace()
        .filter(|w| *w != mask::MASK && w.chars().any(char::is_alphanumeric))
        .count()
}

/// Cuts `s` to at most `max` characters, at a word boundary when one is near.
pub(crate) fn cut_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => {
            let head = &s[..end];
            match head.rfind(' ') {
                Some(sp) if sp > end * 9 / 10 => head[..sp].to_string(),
                _ => head.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str) -> Item {
        Item {
            id: id.into(),
            query: format!("query {id}"),
            title: id.into(),
            text: format!("text {id}"),
        }
    }

    #[test]
    fn splits_are_about_80_10_10_and_depend_on_the_seed() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("id{i}")).collect();
        let count = |seed, s| ids.iter().filter(|id| split_of(id, seed) == s).count();
        assert!((7_700..8_300).contains(&count(0, Split::Train)));
        assert!((850..1_150).contains(&count(0, Split::Dev)));
        assert!((850..1_150).contains(&count(0, Split::Test)));
        let moved = ids
            .iter()
            .filter(|id| split_of(id, 0) != split_of(id, 1))
            .count();
        assert!(moved > 2_000, "a new seed reshuffles ({moved} moved)");
    }

    #[test]
    fn select_is_seeded_keeps_order_and_is_not_a_prefix() {
        let items: Vec<Item> = (0..100).map(|i| item(&format!("i{i}"))).collect();
        let a = select(items.clone(), Some(10), 7);
        assert_eq!(a, select(items.clone(), Some(10), 7));
        assert_eq!(a.len(), 10);
        assert_ne!(a, items[..10].to_vec());
        let pos: Vec<usize> = a
            .iter()
            .map(|x| items.iter().position(|y| y == x).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "source order kept");
        assert_ne!(a, select(items.clone(), Some(10), 8));
        assert_eq!(select(items.clone(), None, 7), items);
    }

    #[test]
    fn written_dataset_loads_and_refuses_an_existing_output() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ds");
        let items: Vec<Item> = (0..60).map(|i| item(&format!("i{i}"))).collect();
        let mut prov = Provenance {
            source: "test".into(),
            packages: vec![],
            seed: 0,
            max_items: None,
            available_items: 60,
            counts: Counts::default(),
            skipped: BTreeMap::new(),
            importer_version: IMPORTER_VERSION,
        };
        write_dataset(&items, &out, 0, &mut prov).unwrap();
        assert_eq!(
            prov.counts.train + prov.counts.dev + prov.counts.test,
            60,
            "{:?}",
            prov.counts
        );
        let read = crate::corpus::ReadOptions::default();
        for split in ["train", "dev", "test"] {
            let s = crate::dataset::load_split(&out, split, &read).unwrap();
            assert_eq!(s.corpus.len(), 60);
            for (q, _) in &s.queries {
                assert_eq!(split_of(q, 0).name(), split);
            }
        }
        let err = write_dataset(&items, &out, 0, &mut prov).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let leftovers = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary directory left behind");
    }

    #[test]
    fn duplicate_queries_keep_the_first_item() {
        let mut p = Parsed {
            items: vec![item("a"), item("b"), item("c")],
            ..Default::default()
        };
        p.items[2].query = "QUERY a".into();
        drop_duplicate_queries(&mut p);
        let ids: Vec<&str> = p.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(p.skipped.values().sum::<usize>(), 1);
    }

    #[test]
    fn cut_chars_respects_characters_and_words() {
        assert_eq!(cut_chars("héllo", 10), "héllo");
        assert_eq!(cut_chars("ééééé", 3), "ééé");
        assert_eq!(
            cut_chars(&"word ".repeat(100), 52),
            "word ".repeat(10).trim_end()
        );
        // No space near the end: cut mid-word rather than lose most of the text.
        assert_eq!(cut_chars("a bcdefghijklmnop", 10), "a bcdefghi");
    }
}
