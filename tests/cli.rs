//! CLI basics.
