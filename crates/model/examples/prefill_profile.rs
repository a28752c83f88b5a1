//! Profiling aid: runs the fast-path prefill (1×142) in a loop so `perf record` sees it.
//! `cargo run --release -p search-r3-model --example prefill_profile -- MODEL.gguf [iters]`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    search_r3_model::init_threads();
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let iters: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let m = search_r3_model::load::load_path(
        &path,
        search_r3_model::fetch::ModelFormat::Gguf,
        &Default::default(),
    )?;
    let ids: Vec<u32> = (0..142u32).map(|i| 17 + (i * 7919) % 40000).collect();
    let batch = search_r3_model::Batch::left_padded(&[ids], 0)?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        m.model.forward(&batch, search_r3_model::Path::Fast, None)?;
    }
    let dt = t0.elapsed().as_secs_f64() / iters as f64;
    println!("{:.1} tok/s ({:.1} ms/forward)", 142.0 / dt, dt * 1e3);
    Ok(())
}
