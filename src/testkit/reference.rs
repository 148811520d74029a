//! (filled by the structure round)
