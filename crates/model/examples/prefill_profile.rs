//! Profiling aid: runs fast-path prefill in a loop so `perf record` sees it.
//! `cargo run --release -p search-r3-model --example prefill_profile -- MODEL.gguf [iters] [batch] [tokens]`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    search_r3_model::init_threads();
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (iters, b, t) = (arg(2, 20), arg(3, 1), arg(4, 142));
    let m = search_r3_model::load_path(
        &path,
        search_r3_model::fetch::ModelFormat::Gguf,
        &Default::default(),
    )?;
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..t as u32)
                .map(|i| 17 + (i * 7919 + r as u32 * 31) % 40000)
                .collect()
        })
        .collect();
    let batch = search_r3_model::Batch::left_padded(&ids, 0)?;
    m.model.forward(&batch, search_r3_model::Path::Fast, None)?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        m.model.forward(&batch, search_r3_model::Path::Fast, None)?;
    }
    let dt = t0.elapsed().as_secs_f64() / iters as f64;
    println!(
        "{b}x{t}: {:.1} tok/s ({:.1} ms/forward)",
        (b * t) as f64 / dt,
        dt * 1e3
    );
    Ok(())
}
