//! The secret canary.
