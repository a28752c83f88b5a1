//! `plot_metrics`: a realistic run renders to a legible PNG, degenerate series do not panic,
//! bad input is reported with its file and line, and the write is atomic.

use search_r3_train::plot::plot_metrics;
use std::collections::HashSet;
use std::path::Path;

/// Decoded RGB(A) image.
struct Image {
    width: u32,
    height: u32,
    channels: usize,
    data: Vec<u8>,
}

impl Image {
    fn pixel(&self, x: u32, y: u32) -> &[u8] {
        let i = (y as usize * self.width as usize + x as usize) * self.channels;
        &self.data[i..i + self.channels]
    }
}

fn decode(path: &Path) -> Image {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = dec.read_info().unwrap();
    let mut data = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut data).unwrap();
    data.truncate(info.buffer_size());
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    Image {
        width: info.width,
        height: info.height,
        channels: info.color_type.samples(),
        data,
    }
}

/// 60 SFT-like step lines (noisy decaying losses, warmup lr) and 3 eval lines.
fn realistic_metrics() -> String {
    let mut s = String::new();
    for step in 1..=60u32 {
        let t = step as f64;
        // Deterministic wiggle so the raw and smoothed curves differ.
        let noise = ((t * 12.9898).sin() * 43758.5453).fract() - 0.5;
        let ce = 9.0 * (-t / 30.0).exp() + 1.0 + 0.3 * noise;
        let nce = 3.0 * (-t / 40.0).exp() + 0.5 + 0.1 * noise;
        let tri = 0.2 * (-t / 20.0).exp() + 0.05 * noise.abs();
        let kl = 0.002 * t + 0.001 * noise;
        let total = ce + nce + tri + 0.1 * kl;
        let lr = 4e-5 * t.min(5.0);
        let grad = 15.0 - 0.1 * t + 3.0 * noise;
        s.push_str(&format!(
            "{{\"grad_norm\":{grad},\"loss\":{{\"ce\":{ce},\"kl\":{kl},\"nce\":{nce},\"total\":{total},\"tri\":{tri}}},\"lr\":{lr},\"seconds\":27.5,\"step\":{step},\"tokens\":5500}}\n"
        ));
        if step % 20 == 0 {
            let ndcg = 0.45 + 0.002 * t;
            s.push_str(&format!(
                "{{\"eval\":{{\"ndcg@10\":{ndcg}}},\"step\":{step}}}\n"
            ));
        }
    }
    s
}

#[test]
fn realistic_run_renders_a_legible_png() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    // A blank line in the middle must be skipped, not rejected.
    std::fs::write(&metrics, realistic_metrics().replacen('\n', "\n\n", 1)).unwrap();
    let out = dir.path().join("curves.png");
    plot_metrics(&metrics, &out, "sft-synthetic").unwrap();

    let img = decode(&out);
    // 8 series (eval ndcg@10, loss.{total,ce,kl,nce,tri}, grad_norm, lr) → 3 rows of 3.
    assert_eq!(img.width, 1600);
    assert!(
        (3 * 400..=3 * 400 + 100).contains(&img.height),
        "height {}",
        img.height
    );
    let distinct: HashSet<&[u8]> = img.data.chunks(img.channels).collect();
    assert!(
        distinct.len() > 50,
        "only {} distinct colours",
        distinct.len()
    );
    // The title is centred in the top band: dark pixels there mean the bundled font rendered.
    let dark = (0..40)
        .flat_map(|y| (600..1000).map(move |x| (x, y)))
        .filter(|&(x, y)| img.pixel(x, y)[..3].iter().all(|&c| c < 128))
        .count();
    assert!(dark > 50, "title area has only {dark} dark pixels");
}

#[test]
fn constant_and_single_point_series_render() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let mut s = String::new();
    for step in 1..=20 {
        s.push_str(&format!(
            "{{\"step\":{step},\"lr\":0.0001,\"zero\":0,\"name\":\"x\",\"flag\":true}}\n"
        ));
    }
    s.push_str("{\"step\":7,\"once\":3.5}\n");
    s.push_str("{\"eval\":{\"ndcg@10\":0.5,\"note\":\"n/a\"},\"step\":20}\n");
    std::fs::write(&metrics, s).unwrap();
    let out = dir.path().join("curves.png");
    plot_metrics(&metrics, &out, "degenerate").unwrap();
    let img = decode(&out);
    assert_eq!(img.width, 1600);

    // A run with a single step line: both axes are degenerate.
    std::fs::write(&metrics, "{\"step\":1,\"loss\":{\"total\":2.0}}\n").unwrap();
    plot_metrics(&metrics, &out, "one step").unwrap();
    assert!(decode(&out).height >= 400);
}

#[test]
fn bad_json_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(
        &metrics,
        "{\"step\":1,\"lr\":1}\n{\"step\":2,\"lr\":1}\n{\"step\":3,\"lr\":\n",
    )
    .unwrap();
    let err = plot_metrics(&metrics, &dir.path().join("c.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains(&metrics.display().to_string()), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("JSON"), "{err}");

    std::fs::write(&metrics, "{\"step\":1,\"lr\":1}\n{\"lr\":1}\n").unwrap();
    let err = plot_metrics(&metrics, &dir.path().join("c.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("step"), "{err}");
    assert!(!dir.path().join("c.png").exists());
}

#[test]
fn nothing_to_plot_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(&metrics, "{\"step\":1}\n{\"step\":2}\n\n").unwrap();
    let err = plot_metrics(&metrics, &dir.path().join("c.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing to plot"), "{err}");
    assert!(err.contains(&metrics.display().to_string()), "{err}");
}

#[test]
fn replotting_replaces_the_png_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let out = dir.path().join("curves.png");
    std::fs::write(&metrics, realistic_metrics()).unwrap();
    plot_metrics(&metrics, &out, "first").unwrap();
    let first = std::fs::read(&out).unwrap();
    plot_metrics(&metrics, &out, "second").unwrap();
    let second = std::fs::read(&out).unwrap();
    assert_ne!(first, second, "the new title must be in the new image");
    decode(&out);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["curves.png", "metrics.jsonl"]);
}
