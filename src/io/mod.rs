//! Everything magictailor reads from or writes to disk besides model folders and images:
//! atomic writes, safetensors, pseudo-word embeddings, checkpoints, and the layout of a
//! training run's output folder. `train` writes through here and `infer` reads through
//! here; neither knows the other.

mod atomic;
pub mod checkpoint;
pub mod console;
pub mod embeds;
pub mod leftovers;
pub mod lock;
pub mod progress;
pub mod run;
pub mod tensors;
pub mod ticker;

pub use atomic::write_atomic;
