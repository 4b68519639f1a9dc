//! Trellis node-side roles.
