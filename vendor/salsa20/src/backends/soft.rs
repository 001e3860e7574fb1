//! Portable implementation which does not rely on architecture-specific
//! intrinsics.
//!
//! kadmq's copy (see `vendor/README.md`): besides one block at a time, it
//! computes [`LANES`] blocks at once, each state word of the four blocks
//! side by side ([`Lanes`]: an SSE2 register on x86-64, its baseline; an
//! array elsewhere). Same keystream.

use crate::{Block, STATE_WORDS, SalsaCore, Unsigned};
use cipher::{
    BlockSizeUser, ParBlocks, ParBlocksSizeUser, StreamCipherBackend, StreamCipherSeekCore,
    consts::{U4, U64},
};

/// Blocks computed at once by [`StreamCipherBackend::gen_par_ks_blocks`].
const LANES: usize = 4;

/// One state word of each of the [`LANES`] blocks: an SSE2 register where
/// the target has SSE2 (every x86-64 target but a few bare-metal ones: no
/// detection needed), an array elsewhere.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod lanes {
    use core::arch::x86_64::{
        __m128i, _mm_add_epi32, _mm_or_si128, _mm_set1_epi32, _mm_set_epi32, _mm_slli_epi32,
        _mm_srli_epi32, _mm_xor_si128,
    };

    #[derive(Clone, Copy)]
    pub(super) struct Lanes(__m128i);

    impl Lanes {
        #[inline(always)]
        pub(super) fn splat(word: u32) -> Self {
            // SAFETY (here and below): this module is built only for targets
            // with SSE2 enabled.
            Lanes(unsafe { _mm_set1_epi32(word as i32) })
        }

        #[inline(always)]
        pub(super) fn from_array(w: [u32; 4]) -> Self {
            Lanes(unsafe { _mm_set_epi32(w[3] as i32, w[2] as i32, w[1] as i32, w[0] as i32) })
        }

        #[inline(always)]
        pub(super) fn to_array(self) -> [u32; 4] {
            // SAFETY: both are 16 bytes, and any bits are a valid value of either.
            unsafe { core::mem::transmute::<__m128i, [u32; 4]>(self.0) }
        }

        #[inline(always)]
        pub(super) fn add(self, other: Self) -> Self {
            Lanes(unsafe { _mm_add_epi32(self.0, other.0) })
        }

        /// `self ^ v.rotate_left(L)`, `R` being `32 - L`.
        #[inline(always)]
        pub(super) fn xor_rotl<const L: i32, const R: i32>(self, v: Self) -> Self {
            Lanes(unsafe {
                let rotated = _mm_or_si128(_mm_slli_epi32::<L>(v.0), _mm_srli_epi32::<R>(v.0));
                _mm_xor_si128(self.0, rotated)
            })
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
mod lanes {
    #[derive(Clone, Copy)]
    pub(super) struct Lanes([u32; 4]);

    impl Lanes {
        #[inline(always)]
        pub(super) fn splat(word: u32) -> Self {
            Lanes([word; 4])
        }

        #[inline(always)]
        pub(super) fn from_array(words: [u32; 4]) -> Self {
            Lanes(words)
        }

        #[inline(always)]
        pub(super) fn to_array(self) -> [u32; 4] {
            self.0
        }

        #[inline(always)]
        pub(super) fn add(self, other: Self) -> Self {
            Lanes(core::array::from_fn(|i| self.0[i].wrapping_add(other.0[i])))
        }

        /// `self ^ v.rotate_left(L)`, `R` being `32 - L`.
        #[inline(always)]
        pub(super) fn xor_rotl<const L: i32, const R: i32>(self, v: Self) -> Self {
            Lanes(core::array::from_fn(|i| self.0[i] ^ v.0[i].rotate_left(L as u32)))
        }
    }
}

use lanes::Lanes;

pub(crate) struct Backend<'a, R: Unsigned>(pub(crate) &'a mut SalsaCore<R>);

impl<R: Unsigned> BlockSizeUser for Backend<'_, R> {
    type BlockSize = U64;
}

impl<R: Unsigned> ParBlocksSizeUser for Backend<'_, R> {
    type ParBlocksSize = U4;
}

impl<R: Unsigned> StreamCipherBackend for Backend<'_, R> {
    #[inline(always)]
    fn gen_ks_block(&mut self, block: &mut Block<Self>) {
        let res = run_rounds::<R>(&self.0.state);

        self.0.set_block_pos(self.0.get_block_pos() + 1);

        for (chunk, val) in block.chunks_exact_mut(4).zip(res.iter()) {
            chunk.copy_from_slice(&val.to_le_bytes());
        }
    }

    #[inline(always)]
    fn gen_par_ks_blocks(&mut self, blocks: &mut ParBlocks<Self>) {
        let pos = self.0.get_block_pos();
        let res = run_rounds_par::<R>(&self.0.state, pos);
        self.0.set_block_pos(pos + LANES as u64);
        for (lane, block) in blocks.iter_mut().enumerate() {
            for (chunk, word) in block.chunks_exact_mut(4).zip(res.iter()) {
                chunk.copy_from_slice(&word[lane].to_le_bytes());
            }
        }
    }
}

#[inline(always)]
fn quarter_round_par(a: usize, b: usize, c: usize, d: usize, x: &mut [Lanes; STATE_WORDS]) {
    x[b] = x[b].xor_rotl::<7, 25>(x[a].add(x[d]));
    x[c] = x[c].xor_rotl::<9, 23>(x[b].add(x[a]));
    x[d] = x[d].xor_rotl::<13, 19>(x[c].add(x[b]));
    x[a] = x[a].xor_rotl::<18, 14>(x[d].add(x[c]));
}

/// [`run_rounds`] for the blocks at `pos`, `pos + 1`, ... `pos + LANES - 1`:
/// word `w` of block `pos + l` is lane `l` of `[w]`.
#[inline(always)]
fn run_rounds_par<R: Unsigned>(state: &[u32; STATE_WORDS], pos: u64) -> [[u32; LANES]; STATE_WORDS] {
    let mut init: [Lanes; STATE_WORDS] = core::array::from_fn(|w| Lanes::splat(state[w]));
    let at: [u64; LANES] = core::array::from_fn(|lane| pos.wrapping_add(lane as u64));
    init[8] = Lanes::from_array(at.map(|p| p as u32));
    init[9] = Lanes::from_array(at.map(|p| (p >> 32) as u32));
    let mut x = init;
    for _ in 0..R::USIZE {
        // column rounds
        quarter_round_par(0, 4, 8, 12, &mut x);
        quarter_round_par(5, 9, 13, 1, &mut x);
        quarter_round_par(10, 14, 2, 6, &mut x);
        quarter_round_par(15, 3, 7, 11, &mut x);

        // diagonal rounds
        quarter_round_par(0, 1, 2, 3, &mut x);
        quarter_round_par(5, 6, 7, 4, &mut x);
        quarter_round_par(10, 11, 8, 9, &mut x);
        quarter_round_par(15, 12, 13, 14, &mut x);
    }
    core::array::from_fn(|w| x[w].add(init[w]).to_array())
}

#[inline]
#[allow(clippy::many_single_char_names)]
pub(crate) fn quarter_round(
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    state: &mut [u32; STATE_WORDS],
) {
    state[b] ^= state[a].wrapping_add(state[d]).rotate_left(7);
    state[c] ^= state[b].wrapping_add(state[a]).rotate_left(9);
    state[d] ^= state[c].wrapping_add(state[b]).rotate_left(13);
    state[a] ^= state[d].wrapping_add(state[c]).rotate_left(18);
}

#[inline(always)]
fn run_rounds<R: Unsigned>(state: &[u32; STATE_WORDS]) -> [u32; STATE_WORDS] {
    let mut res = *state;

    for _ in 0..R::USIZE {
        // column rounds
        quarter_round(0, 4, 8, 12, &mut res);
        quarter_round(5, 9, 13, 1, &mut res);
        quarter_round(10, 14, 2, 6, &mut res);
        quarter_round(15, 3, 7, 11, &mut res);

        // diagonal rounds
        quarter_round(0, 1, 2, 3, &mut res);
        quarter_round(5, 6, 7, 4, &mut res);
        quarter_round(10, 11, 8, 9, &mut res);
        quarter_round(15, 12, 13, 14, &mut res);
    }

    for (s1, s0) in res.iter_mut().zip(state.iter()) {
        *s1 = s1.wrapping_add(*s0);
    }
    res
}
