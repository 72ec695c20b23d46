//! Intel AMX (Sapphire Rapids and later) through inline assembly — Rust has no stable AMX
//! intrinsics — for the bf16 ([`super::bf16`]) and int8 ([`super::int8`]) GEMMs.
//!
//! Linux grants a process the tile state once (`arch_prctl`, asked on first use); each
//! task then configures its thread's eight tiles ([`configure`]: 16 rows × 64 bytes each)
//! and releases them when done ([`release`]), so a context switch need not save them.
//!
//! [`block`] is the one micro-kernel: a 32×32 block of 32-bit sums (2 × 2 tiles) over the
//! whole `k`, from a panel of 32 rows of `A` in tile order (for each 16-row half, its
//! tiles of 16 rows × 64 bytes one after another: tile loads of consecutive memory were
//! measured much faster than strided ones) and one or two packed column blocks of `B` in
//! the VNNI layout (16 columns; for every group of `k` values that fill 4 bytes, the 16
//! columns' groups side by side: bf16 pairs for `tdpbf16ps`, byte quads for `tdpbusd`).

/// Which tile product [`block`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `tdpbf16ps`: bf16 pairs, f32 sums.
    Bf16,
    /// `tdpbusd`: unsigned activation bytes times signed weight bytes, i32 sums (exact).
    Int8,
}

/// Rows (and columns) of the block [`block`] computes.
pub(crate) const TB: usize = 32;
/// Bytes per tile row.
pub(crate) const ROW_BYTES: usize = 64;

/// True when the CPU has AMX with `op` and Linux granted this process the tile data state
/// (asked once).
pub(crate) fn available(op: Op) -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // Asked once: CPUID traps to the hypervisor in a VM (1.6% of a bf16 pass when
        // asked per GEMM).
        static EDX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        // CPUID.(7, 0).EDX: bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
        let edx = *EDX.get_or_init(|| std::arch::x86_64::__cpuid_count(7, 0).edx);
        let bit = match op {
            Op::Bf16 => 22,
            Op::Int8 => 25,
        };
        edx & (1 << 24) != 0 && edx & (1 << bit) != 0 && granted()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = op;
        false
    }
}

/// Asks Linux once for the tile data state: `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn granted() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // Safety: a plain system call; it only changes this process's permissions.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

/// Reorders a row-major panel of [`TB`] rows of `row_bytes` bytes (a multiple of
/// [`ROW_BYTES`]) from `src` into tile order in `dst` (both `TB · row_bytes` long).
pub(crate) fn tile_order<T: Copy>(src: &[T], dst: &mut [T], row_bytes: usize) {
    let per = ROW_BYTES / std::mem::size_of::<T>();
    let (row_len, chunks) = (row_bytes / std::mem::size_of::<T>(), row_bytes / ROW_BYTES);
    assert!(src.len() >= TB * row_len && dst.len() >= TB * row_len);
    for r in 0..TB {
        let (half, row) = (r / 16, r % 16);
        for c in 0..chunks {
            let at = ((half * chunks + c) * 16 + row) * per;
            dst[at..at + per]
                .copy_from_slice(&src[r * row_len + c * per..r * row_len + (c + 1) * per]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{block, configure, release};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Op, ROW_BYTES, TB};
    use std::arch::asm;

    /// The tile configuration: palette 1, tiles 0–7 of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// [`super::available`] must be true.
    pub(crate) unsafe fn configure() {
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        for t in 0..8 {
            c.0[16 + 2 * t] = ROW_BYTES as u8; // bytes per row (little-endian u16)
            c.0[48 + t] = 16; // rows
        }
        asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly));
    }

    /// Gives the tile state back (so a context switch need not save it).
    ///
    /// # Safety
    /// [`super::available`] must be true.
    pub(crate) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// `acc = A · B` (32-bit sums `T`: f32 for bf16, i32 for int8) for A's [`TB`] rows at `a` (tile
    /// order, `row_bytes` bytes a row) and one or two (`two`) packed column blocks of 16
    /// at `b` (`16 · row_bytes` bytes each): tiles 0–3 hold the sums, 4–5 A's rows 0–15
    /// and 16–31, 6–7 the column blocks.
    ///
    /// # Safety
    /// [`configure`] ran on this thread; `a` holds `TB · row_bytes` bytes, `b` (1 or 2) ·
    /// `16 · row_bytes`; `row_bytes` is a multiple of [`ROW_BYTES`].
    pub(crate) unsafe fn block<T: Copy>(
        op: Op,
        a: *const u8,
        row_bytes: usize,
        b: *const u8,
        two: bool,
        acc: &mut [[T; TB]; TB],
    ) {
        debug_assert_eq!(row_bytes % ROW_BYTES, 0);
        debug_assert_eq!(std::mem::size_of::<T>(), 4, "32-bit sums");
        let (sa, sb, sc) = (ROW_BYTES, ROW_BYTES, TB * 4);
        let tile = 16 * ROW_BYTES;
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for kc in 0..row_bytes / ROW_BYTES {
            let a0 = a.add(kc * tile);
            let a1 = a.add(16 * row_bytes + kc * tile);
            let b0 = b.add(kc * tile);
            let b1 = b.add(16 * row_bytes + kc * tile);
            macro_rules! step {
                ($ins:literal) => {
                    if two {
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm6, [{b0} + {sb}*1]",
                            concat!($ins, " tmm0, tmm4, tmm6"),
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            concat!($ins, " tmm2, tmm5, tmm6"),
                            "tileloadd tmm7, [{b1} + {sb}*1]",
                            concat!($ins, " tmm1, tmm4, tmm7"),
                            concat!($ins, " tmm3, tmm5, tmm7"),
                            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                            sa = in(reg) sa, sb = in(reg) sb,
                            options(nostack, readonly)
                        )
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm6, [{b0} + {sb}*1]",
                            concat!($ins, " tmm0, tmm4, tmm6"),
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            concat!($ins, " tmm2, tmm5, tmm6"),
                            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                            sa = in(reg) sa, sb = in(reg) sb,
                            options(nostack, readonly)
                        )
                    }
                };
            }
            match op {
                Op::Bf16 => step!("tdpbf16ps"),
                Op::Int8 => step!("tdpbusd"),
            }
        }
        let c = acc.as_mut_ptr() as *mut u32;
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c.add(16 * TB),
            c3 = in(reg) c.add(16 * TB + 16), sc = in(reg) sc,
            options(nostack)
        );
    }
}
