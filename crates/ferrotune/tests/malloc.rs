//! `malloc::keep_freed_memory`: a worker thread that allocates a batch's buffers, touches
//! them and frees them, batch after batch, stops page-faulting once the heap has grown.
//! Its own binary without the test harness (`harness = false`): the settings must be made
//! before any other thread allocates, and the fault count is this thread's alone.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    assert!(
        ferrotune::malloc::keep_freed_memory(),
        "mallopt refused a setting"
    );
    let faults = std::thread::spawn(|| {
        let mut per_batch = Vec::new();
        for batch in 0..12 {
            let before = minor_faults();
            // Like a forward pass: buffers of 6-20 MiB, a few alive at once, the batch's
            // size changing from batch to batch.
            let floats = (1 << 20) * (3 + batch % 3);
            let mut alive: Vec<Vec<f32>> = Vec::new();
            for k in 0..6 {
                let mut v = vec![0f32; floats / (1 + k % 2)];
                v.iter_mut().step_by(1024).for_each(|x| *x = 1.0);
                alive.push(v);
                if k % 3 == 2 {
                    alive.remove(0);
                }
            }
            drop(alive);
            per_batch.push(minor_faults() - before);
        }
        per_batch
    })
    .join()
    .unwrap();
    println!("minor page faults per batch: {faults:?}");
    // A batch touches ~14,000-24,000 pages; the first batches grow the heap.
    let steady: i64 = faults[4..].iter().sum();
    assert!(
        steady < 200,
        "batches 4-11 page-faulted {steady} times (per batch: {faults:?}): freed memory went back to the OS"
    );
    println!("test malloc::keep_freed_memory ... ok");
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> i64 {
    // Safety: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("test malloc::keep_freed_memory ... skipped: glibc on Linux only");
}
