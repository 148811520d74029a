//! magictailor: component-controllable personalization of Stable Diffusion
//! (MagicTailor, arXiv 2410.13370) in one Rust binary.

pub mod data;
pub mod device;
pub mod embeds;
pub mod error;
pub mod fsutil;
pub mod infer;
pub mod model;
pub mod tiny;
pub mod train;

pub use error::{Error, Result};
