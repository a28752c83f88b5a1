//! Kill-and-resume: an encoding job interrupted between batches and run again produces exactly
//! the vectors of an uninterrupted run, without redoing finished batches.

use search_r3_core::embedder::Embedder;
use search_r3_core::encode::{encode_documents, EncodeError, EncodeOptions};
use search_r3_core::templates::Templates;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn interrupted_encoding_resumes_to_identical_vectors() {
    let Some(m) = search_r3_model::known_model_for_tests("smollm2") else {
        return;
    };
    let t = Templates::for_arch(m.model.config.arch);
    let e = Embedder::new(m, t, 64).unwrap();
    let texts: Vec<String> = (0..24)
        .map(|i| {
            format!(
                "Document {i}: {}",
                "protein folding and heat shock ".repeat(1 + i % 5)
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("encode.ckpt");
    let opts = EncodeOptions {
        batch_tokens: 256,
        checkpoint: Some(ck.clone()),
        progress: false,
    };

    // Cancel from another thread as soon as the first batch is on disk.
    let cancel = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (cancel, ck) = (cancel.clone(), ck.clone());
        std::thread::spawn(move || loop {
            if std::fs::metadata(&ck)
                .map(|m| m.len() > 72)
                .unwrap_or(false)
            {
                cancel.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        })
    };
    let first = encode_documents(&e, &texts, &opts, &cancel);
    watcher.join().unwrap();
    match first {
        Err(EncodeError::Interrupted { done, total }) => {
            assert!(done > 0 && done < total, "{done}/{total}")
        }
        other => panic!(
            "expected an interruption, got {:?}",
            other.map(|r| r.vectors.len())
        ),
    }
    // Simulate a crash mid-append: a torn record at the end must be ignored.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&ck).unwrap();
        f.write_all(&[7, 0, 0, 0, 3, 0, 0]).unwrap();
    }
    let resumed = encode_documents(&e, &texts, &opts, &AtomicBool::new(false)).unwrap();
    assert!(resumed.resumed_batches >= 1);
    let straight = encode_documents(
        &e,
        &texts,
        &EncodeOptions {
            checkpoint: None,
            ..opts.clone()
        },
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(
        resumed.vectors, straight.vectors,
        "resumed run must equal the uninterrupted one"
    );
    // A third run finds every batch done and encodes nothing.
    let again = encode_documents(&e, &texts, &opts, &AtomicBool::new(false)).unwrap();
    assert_eq!(again.tokens, 0);
    assert_eq!(again.vectors, straight.vectors);
}
