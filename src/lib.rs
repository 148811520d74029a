//! magictailor: component-controllable personalization of Stable Diffusion
//! (MagicTailor, arXiv 2410.13370) in one Rust binary.

pub mod batch;
pub mod data;
pub mod device;
pub mod doctor;
pub mod error;
pub mod eval;
pub mod infer;
pub mod info;
pub mod interrupt;
pub mod io;
pub mod kernels;
pub mod masks;
pub mod model;
pub mod preview;
pub mod profile;
pub mod rng;
pub mod train;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::{Error, Result};
