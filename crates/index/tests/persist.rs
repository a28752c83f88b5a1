//! Persistence: round trips, damage detection, crash safety, compatibility checks.

use std::fs;
use std::path::{Path, PathBuf};

use search_r3_index::{
    check_compatible, check_save_target, crash_between_renames, load_index, load_index_with_files,
    random_unit_vectors, read_meta, recover_index, save_index, save_index_failing_at,
    save_index_with_files, AnyIndex, ExactIndex, FailPoint, HnswIndex, HnswParams, IndexError,
    IndexKind, IndexMeta, VectorIndex, FORMAT_VERSION,
};
use serde_json::{json, Map, Value};

const DIM: usize = 48;

fn extra() -> Map<String, Value> {
    let Value::Object(m) = json!({
        "model_id": "smollm2",
        "model_sha256": "b179c952",
        "template_hash": "t1",
        "adapter_id": null,
        "doc_table": "docs.jsonl",
    }) else {
        unreachable!()
    };
    m
}

fn data(n: usize, seed: u64) -> (Vec<u64>, Vec<f32>) {
    let keys = (0..n as u64).map(|i| i * 7 + 1).collect();
    (keys, random_unit_vectors(n, DIM, seed))
}

fn exact(n: usize, seed: u64) -> ExactIndex {
    let (keys, v) = data(n, seed);
    let mut i = ExactIndex::new(DIM).unwrap();
    i.upsert_batch(&keys, &v).unwrap();
    i
}

fn hnsw(n: usize, seed: u64) -> HnswIndex {
    let (keys, v) = data(n, seed);
    HnswIndex::build(DIM, HnswParams::default(), &keys, &v).unwrap()
}

fn same_results(a: &dyn VectorIndex, b: &dyn VectorIndex) {
    assert_eq!(a.len(), b.len());
    assert_eq!(a.keys(), b.keys());
    let qs = random_unit_vectors(40, DIM, 555);
    for q in qs.chunks_exact(DIM) {
        assert_eq!(a.search(q, 10).unwrap(), b.search(q, 10).unwrap());
    }
    for k in a.keys().into_iter().step_by(97) {
        assert_eq!(a.get(k), b.get(k));
        assert_eq!(a.neighbors(k, 8).unwrap(), b.neighbors(k, 8).unwrap());
    }
}

#[test]
fn round_trip_exact_and_hnsw() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = exact(1500, 1);
    e.remove(8).unwrap(); // a hole in the key range
    let dir = tmp.path().join("exact");
    let written = save_index(&dir, &e, &IndexMeta::with_extra(extra())).unwrap();
    assert_eq!(written.kind, IndexKind::Exact);
    assert_eq!(written.count, 1499);
    assert_eq!(written.dim, DIM);
    assert_eq!(written.format_version, FORMAT_VERSION);
    let (loaded, meta) = load_index(&dir).unwrap();
    assert_eq!(meta, written);
    assert_eq!(meta.extra, extra());
    assert_eq!(loaded.kind(), IndexKind::Exact);
    same_results(&e, &loaded);
    assert_eq!(read_meta(&dir).unwrap(), written);

    let mut h = hnsw(1500, 2);
    h.remove(15).unwrap();
    h.upsert(99_999, &random_unit_vectors(1, DIM, 3)).unwrap();
    let dir = tmp.path().join("hnsw");
    let written = save_index(&dir, &h, &IndexMeta::with_extra(extra())).unwrap();
    assert_eq!(written.hnsw, Some(HnswParams::default()));
    let (loaded, meta) = load_index(&dir).unwrap();
    assert_eq!(meta, written);
    assert_eq!(loaded.kind(), IndexKind::Hnsw);
    same_results(&h, &loaded);
    // The loaded index is a working, mutable index.
    let AnyIndex::Hnsw(mut loaded) = loaded else {
        unreachable!()
    };
    loaded
        .upsert(5_000_000, &random_unit_vectors(1, DIM, 4))
        .unwrap();
    assert!(loaded.remove(1).unwrap());
    assert_eq!(loaded.len(), h.len());

    // Saving the same content again gives byte-identical vector files.
    let dir2 = tmp.path().join("exact2");
    save_index(&dir2, &e, &IndexMeta::with_extra(extra())).unwrap();
    for f in ["keys.u64", "vectors.f32", "index.json"] {
        assert_eq!(
            fs::read(tmp.path().join("exact").join(f)).unwrap(),
            fs::read(dir2.join(f)).unwrap(),
            "{f}"
        );
    }

    // An empty index round-trips too.
    let empty = ExactIndex::new(DIM).unwrap();
    let dir = tmp.path().join("empty");
    save_index(&dir, &empty, &IndexMeta::with_extra(Map::new())).unwrap();
    let (loaded, meta) = load_index(&dir).unwrap();
    assert_eq!(meta.count, 0);
    assert!(loaded.is_empty());
}

fn saved(tmp: &Path, name: &str, kind: IndexKind) -> PathBuf {
    let dir = tmp.join(name);
    match kind {
        IndexKind::Exact => save_index(&dir, &exact(300, 5), &IndexMeta::with_extra(extra())),
        IndexKind::Hnsw => save_index(&dir, &hnsw(300, 5), &IndexMeta::with_extra(extra())),
    }
    .unwrap();
    dir
}

fn error_of(dir: &Path) -> IndexError {
    match load_index(dir) {
        Ok(_) => panic!("damaged index at {} loaded", dir.display()),
        Err(e) => e,
    }
}

const FILES: [&str; 5] = [
    "keys.u64",
    "vectors.f32",
    "labels.u64",
    "graph.usearch",
    "index.json",
];

#[test]
fn truncated_files_are_rejected_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, file) in FILES.iter().enumerate() {
        let dir = saved(tmp.path(), &format!("t{i}"), IndexKind::Hnsw);
        let path = dir.join(file);
        let len = fs::metadata(&path).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        let err = error_of(&dir);
        let msg = err.to_string();
        assert!(msg.contains(file), "{file}: {msg}");
        if *file == "index.json" {
            assert!(matches!(err, IndexError::Corrupt { .. }), "{msg}");
        } else {
            assert!(matches!(err, IndexError::SizeMismatch { .. }), "{msg}");
            assert!(msg.contains("truncated"), "{msg}");
        }
    }
}

#[test]
fn bit_flips_are_rejected_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, file) in FILES.iter().enumerate() {
        for kind in [IndexKind::Exact, IndexKind::Hnsw] {
            if kind == IndexKind::Exact && (*file == "graph.usearch" || *file == "labels.u64") {
                continue;
            }
            let dir = saved(tmp.path(), &format!("b{i}{kind:?}"), kind);
            let path = dir.join(file);
            let mut bytes = fs::read(&path).unwrap();
            // Flip one bit in the middle, where it hits data (in index.json: inside a hash
            // string, so the file still parses as JSON and only the checksum can tell).
            let at = if *file == "index.json" {
                let text = String::from_utf8(bytes.clone()).unwrap();
                text.find("\"sha256\": \"").unwrap() + 15
            } else {
                bytes.len() / 2
            };
            bytes[at] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            let err = error_of(&dir);
            let msg = err.to_string();
            assert!(msg.contains(file), "{file}: {msg}");
            assert!(
                matches!(err, IndexError::ChecksumMismatch { .. }),
                "{file}: {msg}"
            );
        }
    }
}

#[test]
fn wrong_version_missing_file_and_foreign_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = saved(tmp.path(), "v", IndexKind::Exact);
    let path = dir.join("index.json");
    let text = fs::read_to_string(&path).unwrap();
    let newer = text.replace(
        &format!("\"format_version\": {FORMAT_VERSION}"),
        "\"format_version\": 999",
    );
    assert_ne!(newer, text);
    fs::write(&path, newer).unwrap();
    let err = error_of(&dir);
    assert!(
        matches!(err, IndexError::UnsupportedVersion { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("index.json") && err.to_string().contains("999"));
    assert!(read_meta(&dir).is_err());

    for file in FILES {
        let dir = saved(tmp.path(), &format!("m-{file}"), IndexKind::Hnsw);
        fs::remove_file(dir.join(file)).unwrap();
        let err = error_of(&dir);
        assert!(matches!(err, IndexError::MissingFile { .. }), "{err}");
        assert!(err.to_string().contains(file), "{err}");
    }

    let dir = tmp.path().join("foreign");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("index.json"), "{\"hello\": 1}").unwrap();
    let err = error_of(&dir);
    assert!(matches!(err, IndexError::Corrupt { .. }), "{err}");

    // A manifest edited by hand (count changed, checksum not updated) is caught too.
    let dir = saved(tmp.path(), "edited", IndexKind::Exact);
    let path = dir.join("index.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("\"count\": 300", "\"count\": 299")).unwrap();
    assert!(matches!(
        error_of(&dir),
        IndexError::ChecksumMismatch { .. }
    ));

    assert!(matches!(
        error_of(&tmp.path().join("nowhere")),
        IndexError::MissingFile { .. }
    ));
}

#[test]
fn interrupted_saves_leave_the_previous_index_loadable() {
    let tmp = tempfile::tempdir().unwrap();
    let old = exact(200, 1);
    let new = exact(250, 2);
    let meta = IndexMeta::with_extra(extra());
    for (i, fail) in [
        FailPoint::AfterDataFiles,
        FailPoint::BeforeSwap,
        FailPoint::BetweenRenames,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("crash{i}"));
        save_index(&dir, &old, &meta).unwrap();
        let err = save_index_failing_at(&dir, &new, &meta, fail).unwrap_err();
        assert!(matches!(err, IndexError::Injected(_)));
        // The "crashed" process left its temporary (or renamed-away) directory behind.
        let leftovers = fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with(&format!(".crash{i}."))
            })
            .count();
        assert!(leftovers >= 1, "{fail:?}");
        let (loaded, m) = load_index(&dir).unwrap();
        assert_eq!(m.count, 200, "{fail:?}");
        same_results(&old, &loaded);
        // The next save succeeds and cleans up after the crashed one.
        save_index(&dir, &new, &meta).unwrap();
        let (loaded, _) = load_index(&dir).unwrap();
        same_results(&new, &loaded);
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!(".crash{i}.")))
            .collect();
        assert!(names.is_empty(), "{fail:?}: {names:?}");
    }

    // Killed after the swap: the new index is already complete and in place.
    let dir = tmp.path().join("late");
    save_index(&dir, &old, &meta).unwrap();
    save_index_failing_at(&dir, &new, &meta, FailPoint::AfterSwap).unwrap_err();
    let (loaded, _) = load_index(&dir).unwrap();
    same_results(&new, &loaded);
}

#[test]
fn failed_write_leaves_previous_index_and_no_debris() {
    let tmp = tempfile::tempdir().unwrap();
    let old = exact(100, 1);
    let meta = IndexMeta::with_extra(extra());
    let dir = tmp.path().join("idx");
    save_index(&dir, &old, &meta).unwrap();

    // Poisoned paths: the target is a file, or a directory holding something else. Both are
    // refused before anything is written, so nobody's files are replaced.
    let file = tmp.path().join("a-file");
    fs::write(&file, "precious").unwrap();
    let err = save_index(&file, &old, &meta).unwrap_err();
    assert!(matches!(err, IndexError::NotAnIndexDir { .. }), "{err}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "precious");
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    fs::write(home.join("notes.txt"), "mine").unwrap();
    let err = save_index(&home, &old, &meta).unwrap_err();
    assert!(err.to_string().contains("not an index directory"), "{err}");
    assert!(home.join("notes.txt").exists());

    // A parent that cannot be created (a file is in the way): an I/O error naming the path.
    let err = save_index(file.join("sub"), &old, &meta).unwrap_err();
    assert!(matches!(err, IndexError::Io { .. }), "{err}");

    // The previous index is untouched by all of that.
    let (loaded, _) = load_index(&dir).unwrap();
    same_results(&old, &loaded);
}

#[test]
fn compatibility_check_lists_every_difference() {
    let meta = IndexMeta::with_extra(extra());
    check_compatible(&meta, &extra()).unwrap();
    // Keys the caller does not ask about (doc_table) are ignored.
    let mut subset = Map::new();
    subset.insert("model_sha256".into(), json!("b179c952"));
    check_compatible(&meta, &subset).unwrap();

    let mut other = extra();
    other.insert("model_sha256".into(), json!("deadbeef"));
    other.insert("template_hash".into(), json!("t2"));
    other.insert("adapter_id".into(), json!("lora-7"));
    other.insert("embed_mode".into(), json!("direct"));
    let err = check_compatible(&meta, &other).unwrap_err();
    let IndexError::Incompatible { differences } = &err else {
        panic!("{err}")
    };
    let keys: Vec<&str> = differences.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for k in ["model_sha256", "template_hash", "adapter_id", "embed_mode"] {
        assert!(keys.contains(&k), "{k}");
    }
    let msg = err.to_string();
    assert!(
        msg.contains("model_sha256 differs (index has \"b179c952\", expected \"deadbeef\")"),
        "{msg}"
    );
    assert!(
        msg.contains("embed_mode is not recorded in the index"),
        "{msg}"
    );
}

#[test]
fn caller_files_travel_with_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("withdocs");
    let h = hnsw(200, 9);
    let table = b"{\"id\":\"d1\"}\n{\"id\":\"d2\"}\n".to_vec();
    let meta = IndexMeta::with_extra(extra());
    save_index_with_files(&dir, &h, &meta, &[("docs.jsonl", table.clone())]).unwrap();
    let (loaded, m, files) = load_index_with_files(&dir).unwrap();
    assert_eq!(m.count, 200);
    same_results(&h, &loaded);
    assert_eq!(files.len(), 1);
    assert_eq!(files["docs.jsonl"], table);
    // Plain load_index still verifies the extra file.
    let path = dir.join("docs.jsonl");
    let mut bytes = fs::read(&path).unwrap();
    bytes[3] ^= 0x20;
    fs::write(&path, &bytes).unwrap();
    let err = error_of(&dir);
    assert!(matches!(err, IndexError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("docs.jsonl"), "{err}");
    fs::remove_file(&path).unwrap();
    assert!(matches!(error_of(&dir), IndexError::MissingFile { .. }));

    // Names that could escape the directory or overwrite the format's own files are refused.
    for bad in ["../evil", "keys.u64", "index.json", ".hidden", "a/b", ""] {
        let err = save_index_with_files(&dir, &h, &meta, &[(bad, b"x".to_vec())]).unwrap_err();
        assert!(matches!(err, IndexError::Io { .. }), "{bad}: {err}");
    }
    let twice = [("a.txt", b"1".to_vec()), ("a.txt", b"2".to_vec())];
    assert!(save_index_with_files(&dir, &h, &meta, &twice).is_err());
}

fn debris(tmp: &Path, name: &str) -> Vec<String> {
    fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// After a crash between the two renames, `.NAME.old-*` is the only copy of the index. A save
/// started from that state puts it back at `dir` first: a save that stops anywhere before its
/// own swap leaves the index at `dir` (where every reader, `serve` included, looks), and only a
/// save that completes replaces it.
#[test]
fn a_save_never_deletes_the_only_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let old = exact(120, 1);
    let new = exact(90, 2);
    let meta = IndexMeta::with_extra(extra());
    for (i, fail) in [
        FailPoint::AfterDataFiles,
        FailPoint::BeforeSwap,
        FailPoint::BetweenRenames,
        FailPoint::AfterSwap,
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("only{i}");
        let dir = tmp.path().join(&name);
        save_index(&dir, &old, &meta).unwrap();
        crash_between_renames(&dir);
        let err = save_index_failing_at(&dir, &new, &meta, fail).unwrap_err();
        assert!(matches!(err, IndexError::Injected(_)), "{fail:?}: {err}");
        match fail {
            FailPoint::AfterDataFiles | FailPoint::BeforeSwap => {
                // Back in place before the new index was even complete.
                assert!(dir.join("index.json").is_file(), "{fail:?}");
                let (loaded, _) = load_index(&dir).unwrap();
                same_results(&old, &loaded);
            }
            FailPoint::BetweenRenames => {
                // Crashed in the same spot again: still recoverable.
                let (loaded, _) = load_index(&dir).unwrap();
                same_results(&old, &loaded);
            }
            FailPoint::AfterSwap => {
                let (loaded, _) = load_index(&dir).unwrap();
                same_results(&new, &loaded);
            }
        }
        save_index(&dir, &new, &meta).unwrap();
        let (loaded, _) = load_index(&dir).unwrap();
        same_results(&new, &loaded);
        assert!(debris(tmp.path(), &name).is_empty(), "{fail:?}");
    }
}

#[test]
fn recovery_puts_back_only_the_copy_of_this_index() {
    let tmp = tempfile::tempdir().unwrap();
    let a = exact(50, 3);
    let meta = IndexMeta::with_extra(extra());

    // Nothing anywhere: no index, nothing created.
    let dir = tmp.path().join("idx");
    assert!(!recover_index(&dir).unwrap());
    assert!(!dir.exists());

    // The crash state: the copy is renamed back and is the index again.
    save_index(&dir, &a, &meta).unwrap();
    crash_between_renames(&dir);
    assert!(recover_index(&dir).unwrap());
    assert!(dir.join("index.json").is_file());
    assert!(debris(tmp.path(), "idx").is_empty());
    assert!(
        recover_index(&dir).unwrap(),
        "an index in place is left as it is"
    );

    // An empty directory holds nothing to lose, so the copy replaces it too.
    crash_between_renames(&dir);
    fs::create_dir(&dir).unwrap();
    assert!(recover_index(&dir).unwrap());
    same_results(&a, &load_index(&dir).unwrap().0);

    // A directory with someone's files, or a file, is never replaced by recovery.
    let old = crash_between_renames(&dir);
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    assert!(!recover_index(&dir).unwrap());
    assert!(old.join("index.json").is_file());
    fs::remove_dir_all(&dir).unwrap();
    fs::write(&dir, "a file").unwrap();
    assert!(!recover_index(&dir).unwrap());
    assert_eq!(fs::read_to_string(&dir).unwrap(), "a file");
    fs::remove_file(&dir).unwrap();
    assert!(recover_index(&dir).unwrap());

    // The copy of an index whose name merely starts like this one's is not this index's.
    let other = tmp.path().join("idx.old-x");
    save_index(&other, &a, &meta).unwrap();
    crash_between_renames(&other);
    let lone = tmp.path().join("idx");
    fs::remove_dir_all(&lone).unwrap();
    assert!(!recover_index(&lone).unwrap());
    assert!(recover_index(&other).unwrap());
}

#[test]
fn save_targets_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    check_save_target(tmp.path().join("new/deeper")).unwrap();
    let dir = tmp.path().join("idx");
    save_index(&dir, &exact(10, 1), &IndexMeta::with_extra(extra())).unwrap();
    check_save_target(&dir).unwrap();
    check_save_target(tmp.path()).unwrap_err();

    let file = tmp.path().join("f");
    fs::write(&file, "x").unwrap();
    let err = check_save_target(&file).unwrap_err();
    assert!(matches!(err, IndexError::NotAnIndexDir { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(file.to_str().unwrap()) && msg.contains("it is a file"),
        "{msg}"
    );
    let err = check_save_target(file.join("sub/idx"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(file.join("sub/idx").to_str().unwrap())
            && err.contains(&format!("{} is a file, not a directory", file.display())),
        "{err}"
    );
}
