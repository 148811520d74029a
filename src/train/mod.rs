//! MagicTailor training (paper §3): DM-Deg, the masked diffusion and cross-attention
//! losses, the warm-up phase, and DS-Bal with its momentum U-Net.

pub mod dm_deg;
pub mod ds_bal;
pub mod losses;
pub mod optim;
