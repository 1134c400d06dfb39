//! Thread settings for candle's CPU kernels.
//!
//! candle asks for its thread count on every quantized matmul; without
//! `RAYON_NUM_THREADS` it works the count out from the CPU topology each time,
//! and idle rayon workers spin. Two busy processes that each take every core
//! collapse to a few tokens per second. Pollen therefore always sets the
//! count explicitly, once, before any thread pool starts.

/// Cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sets candle's and rayon's thread counts for this process. Must be called
/// at the very start of `main`, before any other thread exists.
#[allow(unsafe_code)]
pub fn configure(threads: usize) {
    let n = threads.max(1).to_string();
    // SAFETY: called first thing in `main`, while the process has one thread,
    // so no other thread can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &n);
        std::env::set_var("CANDLE_NUM_THREADS", &n);
    }
}
