//! [`Collective`] over MPI (Open MPI from Debian, through the `mpi` crate): cargo feature
//! `mpi`. MPI is initialised once, by [`Mpi::init`], and finalised when the last handle
//! is dropped.

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::Collective;
use crate::error::{Error, Result};

/// `MPI_COMM_WORLD`.
pub struct Mpi {
    world: SimpleCommunicator,
    host: String,
    version: String,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI (only the thread that trains calls it: `MPI_THREAD_FUNNELED`).
    pub fn init() -> Result<Mpi> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Msg("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let host = mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into());
        let version = mpi::environment::library_version()
            .ok()
            // "Open MPI v4.1.4, package: ...": the name and version.
            .and_then(|v| v.split([',', '\n']).next().map(|l| l.trim().to_string()))
            .unwrap_or_else(|| "MPI".into());
        Ok(Mpi {
            world,
            host,
            version,
            _universe: universe,
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn host(&self) -> &str {
        &self.host
    }
    fn transport(&self) -> Option<String> {
        Some(self.version.clone())
    }
    fn sum_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.world
            .all_reduce_into(send, recv, SystemOperation::sum());
    }
    fn sum_f64(&self, send: &[f64], recv: &mut [f64]) {
        self.world
            .all_reduce_into(send, recv, SystemOperation::sum());
    }
    fn gather_u64(&self, v: u64) -> Vec<u64> {
        let mut out = vec![0u64; self.size()];
        self.world.all_gather_into(&v, &mut out[..]);
        out
    }
    fn gather_f32(&self, mine: &[f32], counts: &[usize]) -> Vec<f32> {
        let total: usize = counts.iter().sum();
        let mut out = vec![0f32; total];
        let c: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        let d: Vec<i32> = c
            .iter()
            .scan(0i32, |at, &n| {
                let s = *at;
                *at += n;
                Some(s)
            })
            .collect();
        let mut part = PartitionMut::new(&mut out[..], &c[..], &d[..]);
        self.world.all_gather_varcount_into(mine, &mut part);
        out
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
