//! Data-parallel training over several processes (ranks), started by `mpirun` or Slurm.
//!
//! Every rank builds the same model from the same seed and reads the same data; each
//! global batch (`per_device_train_batch_size` × world size) is split across the ranks in a
//! fixed order; the gradients are summed over the ranks ([`GradReducer`]), each rank's
//! loss having been weighted by its share of the global batch, so the sum is the gradient
//! of the mean over the global batch; the optimizer step is then the same on every rank.
//! The trainer ([`crate::train::trainer`]) asks a [`World`] for these collectives and
//! never names MPI: the transport is behind the [`Collective`] trait — [`Solo`] for one
//! process, `mpi::Mpi` (cargo feature `mpi`, Open MPI through the `mpi` crate) for many,
//! and room for NCCL on GPUs (docs/DISTRIBUTED.md).

#[cfg(feature = "mpi")]
pub mod mpi;

use std::rc::Rc;
use std::time::Instant;

use crate::error::{Error, Result};

/// The collectives data-parallel training needs. Every rank calls them in the same order
/// with the same sizes; the results are the same on every rank.
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// The host this rank runs on.
    fn host(&self) -> &str;
    /// What carries the messages (`"Open MPI 4.1.4"`), `None` for one process.
    fn transport(&self) -> Option<String>;
    /// `recv[i] = Σ_ranks send[i]`.
    fn sum_f32(&self, send: &[f32], recv: &mut [f32]);
    /// `recv[i] = Σ_ranks send[i]`.
    fn sum_f64(&self, send: &[f64], recv: &mut [f64]);
    /// Every rank's `v`, in rank order.
    fn gather_u64(&self, v: u64) -> Vec<u64>;
    /// Every rank's `mine` concatenated in rank order; `counts[r]` is rank r's length.
    fn gather_f32(&self, mine: &[f32], counts: &[usize]) -> Vec<f32>;
    /// Ends every rank at once (after an error on this one), with exit code `code`.
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn host(&self) -> &str {
        "localhost"
    }
    fn transport(&self) -> Option<String> {
        None
    }
    fn sum_f32(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn sum_f64(&self, send: &[f64], recv: &mut [f64]) {
        recv.copy_from_slice(send);
    }
    fn gather_u64(&self, v: u64) -> Vec<u64> {
        vec![v]
    }
    fn gather_f32(&self, mine: &[f32], _counts: &[usize]) -> Vec<f32> {
        mine.to_vec()
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The ranks of a run: a handle on the [`Collective`] carrying them (used from the thread
/// that trains only: MPI is initialised `MPI_THREAD_FUNNELED`).
#[derive(Clone)]
pub struct World(Rc<dyn Collective>);

impl Default for World {
    /// One process.
    fn default() -> Self {
        World(Rc::new(Solo))
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World(rank {} of {})", self.rank(), self.size())
    }
}

/// True when this build carries MPI (cargo feature `mpi`).
pub const MPI_BUILT_IN: bool = cfg!(feature = "mpi");

/// The world size a launcher (Open MPI's `mpirun`, Slurm's `srun`, a PMI launcher) set in
/// the environment, if any.
pub fn launcher_world_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_SIZE",
        "PMI_SIZE",
        "SLURM_NTASKS",
    ]
    .iter()
    .filter(|k| **k != "SLURM_NTASKS" || std::env::var_os("SLURM_STEP_ID").is_some())
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

impl World {
    /// A world over `c`.
    pub fn new(c: Rc<dyn Collective>) -> Self {
        World(c)
    }

    /// The world the process was started in: several ranks under `mpirun`/`srun` (this
    /// build must carry MPI), else one. MPI is initialised here, once per process.
    pub fn from_launcher() -> Result<World> {
        let n = launcher_world_size().unwrap_or(1);
        #[cfg(feature = "mpi")]
        if n > 1 || std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
            return Ok(World(Rc::new(mpi::Mpi::init()?)));
        }
        match without_mpi(n) {
            Some(e) => Err(e),
            None => Ok(World::default()),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.0.rank()
    }
    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.0.size()
    }
    /// Rank 0: the one that prints, logs, checkpoints and exports.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// More than one rank.
    pub fn is_distributed(&self) -> bool {
        self.size() > 1
    }
    /// This rank's host.
    pub fn host(&self) -> &str {
        self.0.host()
    }
    /// The collectives.
    pub fn comm(&self) -> &dyn Collective {
        self.0.as_ref()
    }
    /// "rank R on HOST" (for messages).
    pub fn who(&self) -> String {
        format!("rank {} on {}", self.rank(), self.host())
    }
    /// Every rank's host, in rank order (one collective).
    pub fn hosts(&self) -> Vec<String> {
        if !self.is_distributed() {
            return vec![self.host().to_string()];
        }
        // The names' bytes ride in the f32 gather (every byte is exact in an f32).
        let mine: Vec<f32> = self.host().bytes().map(|b| b as f32).collect();
        let counts: Vec<usize> = self
            .0
            .gather_u64(mine.len() as u64)
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let all = self.0.gather_f32(&mine, &counts);
        let mut at = 0;
        counts
            .iter()
            .map(|&c| {
                let s: Vec<u8> = all[at..at + c].iter().map(|&x| x as u8).collect();
                at += c;
                String::from_utf8_lossy(&s).into_owned()
            })
            .collect()
    }

    /// Checks that every rank holds the same `what` (the resolved recipe, the data), by a
    /// hash of `bytes`, before anything is trained: a one-line error naming the ranks that
    /// differ from rank 0.
    pub fn check_same(&self, what: &str, bytes: &[u8]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let hashes = self.0.gather_u64(hash64(bytes));
        let differ: Vec<String> = hashes
            .iter()
            .enumerate()
            .filter(|(_, h)| **h != hashes[0])
            .map(|(r, _)| r.to_string())
            .collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "the ranks hold different {what}: rank(s) {} differ from rank 0 (every \
                 rank must run the same recipe, --set values and data files)",
                differ.join(", ")
            )))
        }
    }

    /// True on every rank when `flag` is true on any (one collective).
    pub fn any(&self, flag: bool) -> bool {
        if !self.is_distributed() {
            return flag;
        }
        let mut out = [0f64];
        self.0.sum_f64(&[flag as u8 as f64], &mut out);
        out[0] > 0.0
    }

    /// The largest `v` over the ranks (one collective).
    pub fn max_u64(&self, v: u64) -> u64 {
        self.0.gather_u64(v).into_iter().max().unwrap_or(v)
    }

    /// This rank's part of `items`, split into `size` contiguous parts whose lengths
    /// differ by at most one (the first parts the longer).
    pub fn part<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        &items[self.range(items.len())]
    }

    /// Where this rank's [`part`](Self::part) of `n` items lies.
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        part_range(n, self.rank(), self.size())
    }

    /// The lengths of every rank's [`part`](Self::part) of `n` items.
    pub fn part_counts(&self, n: usize) -> Vec<usize> {
        (0..self.size())
            .map(|r| part_range(n, r, self.size()).len())
            .collect()
    }
}

/// The default threads of one rank that sees `visible` cores: all of them when the
/// launcher bound the rank to fewer cores than the host has (`mpirun --map-by
/// slot:PE=k`, or its default of one core per rank for two ranks or fewer), else the
/// host's cores shared by the ranks on it (`OMPI_COMM_WORLD_LOCAL_SIZE`).
pub fn threads_per_rank(visible: usize) -> usize {
    // SAFETY: sysconf only reads a system setting.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let host = if online > 0 { online as usize } else { visible };
    let local: usize = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
    .unwrap_or(1);
    if visible < host {
        visible.max(1)
    } else {
        (visible / local.max(1)).max(1)
    }
}

/// Under Open MPI's `mpirun`, a note when Ctrl-C/SIGTERM would kill the ranks before they
/// can checkpoint: mpirun sends SIGKILL `odls_base_sigkill_timeout` seconds (default 1)
/// after SIGTERM.
pub fn signal_note() -> Option<String> {
    std::env::var_os("OMPI_COMM_WORLD_SIZE")?;
    let secs: u64 = std::env::var("OMPI_MCA_odls_base_sigkill_timeout")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    (secs < 10).then(|| {
        format!(
            "mpirun kills the ranks {secs} s after Ctrl-C/SIGTERM, before they can \
             checkpoint; add `--mca odls_base_sigkill_timeout 60` to stop with a checkpoint"
        )
    })
}

/// The error of a build without MPI started as one of `n` ranks (`None` for one): the
/// ranks would otherwise each train alone into the same output directory.
fn without_mpi(n: usize) -> Option<Error> {
    (n > 1).then(|| {
        Error::Msg(format!(
            "started by a launcher as one of {n} ranks, but this ferrotune was built without \
             MPI: build it with `cargo build --release -p ferrotune-cli --features mpi` \
             (needs Open MPI: apt-get install libopenmpi-dev openmpi-bin libclang-dev)"
        ))
    })
}

/// Rank `r`'s range of `n` items split over `p` ranks.
pub fn part_range(n: usize, r: usize, p: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / p, n % p);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// FNV-1a, 64 bits: the same on every host and build.
pub fn hash64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Sums gradients over the ranks in buckets of at most [`GradReducer::BUCKET`] floats
/// (PyTorch DDP's default `bucket_cap_mb = 25`): the trainable parameters' gradients, in
/// parameter order, are one stream cut into buckets; each is packed, summed and unpacked.
/// Counts the bytes and seconds spent.
pub struct GradReducer {
    send: Vec<f32>,
    recv: Vec<f32>,
    /// Bytes summed over the ranks so far (one rank's share of the message).
    pub bytes: u64,
    /// Seconds spent in the collectives so far (packing included).
    pub seconds: f64,
}

impl Default for GradReducer {
    fn default() -> Self {
        GradReducer {
            send: Vec::new(),
            recv: Vec::new(),
            bytes: 0,
            seconds: 0.0,
        }
    }
}

impl GradReducer {
    /// Floats per bucket (25 MiB).
    pub const BUCKET: usize = 25 << 18;

    /// Sums `grads` and `scalars` over the ranks in place. `sizes[i]` is parameter i's
    /// element count when it trains (`None`: frozen, no gradient on any rank). A trainable
    /// parameter without a gradient on this rank counts as zeros; one without a gradient
    /// on every rank stays `None`. `scalars` (losses, flags) are summed in f64 first.
    pub fn reduce(
        &mut self,
        world: &World,
        sizes: &[Option<usize>],
        grads: &mut [Option<Vec<f32>>],
        scalars: &mut [f64],
    ) {
        let t0 = Instant::now();
        let comm = world.comm();
        // Which parameters have a gradient somewhere, riding with the scalars.
        let mut small: Vec<f64> = scalars.to_vec();
        small.extend(grads.iter().map(|g| g.is_some() as u8 as f64));
        let mut summed = vec![0f64; small.len()];
        comm.sum_f64(&small, &mut summed);
        scalars.copy_from_slice(&summed[..scalars.len()]);
        let present = &summed[scalars.len()..];
        for ((g, size), &p) in grads.iter_mut().zip(sizes).zip(present) {
            match size {
                Some(n) if p > 0.0 => {
                    if g.as_ref().is_none_or(|v| v.len() != *n) {
                        *g = Some(vec![0f32; *n]);
                    }
                }
                _ => *g = None,
            }
        }
        let total: usize = grads.iter().flatten().map(|g| g.len()).sum();
        let cap = Self::BUCKET.min(total.max(1));
        self.send.resize(cap, 0.0);
        self.recv.resize(cap, 0.0);
        // (parameter, offset) where the next bucket starts.
        let mut at = (0usize, 0usize);
        let mut done = 0;
        while done < total {
            let len = cap.min(total - done);
            let pieces = bucket(grads, &mut at, len);
            for &(i, off, n, b) in &pieces {
                let g = grads[i].as_deref().unwrap_or_default();
                self.send[b..b + n].copy_from_slice(&g[off..off + n]);
            }
            comm.sum_f32(&self.send[..len], &mut self.recv[..len]);
            for &(i, off, n, b) in &pieces {
                if let Some(g) = &mut grads[i] {
                    g[off..off + n].copy_from_slice(&self.recv[b..b + n]);
                }
            }
            self.bytes += 4 * len as u64;
            done += len;
        }
        self.seconds += t0.elapsed().as_secs_f64();
    }
}

/// The pieces of the next bucket of `len` floats of the gradient stream from `at`, as
/// (parameter, offset in it, length, offset in the bucket); moves `at` past them.
fn bucket(
    grads: &[Option<Vec<f32>>],
    at: &mut (usize, usize),
    len: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let mut pieces = Vec::new();
    let mut filled = 0;
    while filled < len {
        let (i, off) = *at;
        let size = grads[i].as_ref().map_or(0, Vec::len);
        let n = (size - off).min(len - filled);
        if n > 0 {
            pieces.push((i, off, n, filled));
        }
        filled += n;
        *at = if off + n == size {
            (i + 1, 0)
        } else {
            (i, off + n)
        };
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// `p` ranks in one process, run one after the other: rank r's call records its
    /// buffer; the sum is known once all have called. Used to test the reducer's packing:
    /// with every rank's gradients equal to rank 0's times (r+1), the sum is rank 0's
    /// times p(p+1)/2.
    struct Scaled {
        p: usize,
        calls: RefCell<usize>,
    }
    impl Collective for Scaled {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.p
        }
        fn host(&self) -> &str {
            "test"
        }
        fn transport(&self) -> Option<String> {
            Some("test".into())
        }
        fn sum_f32(&self, send: &[f32], recv: &mut [f32]) {
            *self.calls.borrow_mut() += 1;
            let k = (self.p * (self.p + 1) / 2) as f32;
            recv.iter_mut().zip(send).for_each(|(r, s)| *r = s * k);
        }
        fn sum_f64(&self, send: &[f64], recv: &mut [f64]) {
            recv.iter_mut()
                .zip(send)
                .for_each(|(r, s)| *r = s * self.p as f64);
        }
        fn gather_u64(&self, v: u64) -> Vec<u64> {
            vec![v; self.p]
        }
        fn gather_f32(&self, mine: &[f32], _: &[usize]) -> Vec<f32> {
            mine.repeat(self.p)
        }
        fn abort(&self, _: i32) -> ! {
            panic!("abort")
        }
    }

    #[test]
    fn parts_cover_the_items_in_order_and_differ_by_at_most_one() {
        for n in 0..40 {
            for p in 1..7 {
                let ranges: Vec<_> = (0..p).map(|r| part_range(n, r, p)).collect();
                let mut next = 0;
                for r in &ranges {
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
                let lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
        // 2 ranks × 8 of a global batch of 16: the first 8 and the last 8.
        assert_eq!(part_range(16, 0, 2), 0..8);
        assert_eq!(part_range(16, 1, 2), 8..16);
    }

    #[test]
    fn buckets_pack_every_gradient_once_across_bucket_and_parameter_edges() {
        let scaled = Rc::new(Scaled {
            p: 3,
            calls: RefCell::new(0),
        });
        let world = World::new(scaled.clone());
        // A parameter larger than a bucket, small ones, a frozen one, and one with no
        // gradient on any rank.
        let big = GradReducer::BUCKET + 17;
        let sizes = vec![Some(5), Some(big), None, Some(3), Some(2)];
        let mut grads: Vec<Option<Vec<f32>>> = vec![
            Some((0..5).map(|i| i as f32).collect()),
            Some((0..big).map(|i| (i % 1000) as f32 * 0.5).collect()),
            None,
            Some(vec![1.0, 2.0, 3.0]),
            None,
        ];
        let want: Vec<Option<Vec<f32>>> = grads
            .iter()
            .map(|g| g.as_ref().map(|g| g.iter().map(|x| x * 6.0).collect()))
            .collect();
        let mut scalars = [1.5, 0.0];
        let mut r = GradReducer::default();
        r.reduce(&world, &sizes, &mut grads, &mut scalars);
        assert_eq!(scalars, [4.5, 0.0]);
        for i in [0, 1, 3] {
            assert_eq!(grads[i], want[i], "parameter {i}");
        }
        assert_eq!(grads[2], None);
        // No gradient on any (simulated) rank: none after the sum either.
        assert_eq!(grads[4], None);
        let total = 5 + big + 3;
        assert_eq!(r.bytes, 4 * total as u64);
        assert_eq!(*scaled.calls.borrow(), 2);
    }

    #[test]
    fn a_build_without_mpi_refuses_several_ranks_in_one_line() {
        assert!(without_mpi(1).is_none());
        let e = without_mpi(2).unwrap().to_string();
        assert!(
            e.contains("one of 2 ranks") && e.contains("--features mpi"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn hash_is_fnv1a() {
        assert_eq!(hash64(b""), 0xcbf29ce484222325);
        assert_eq!(hash64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
