//! (being written)
use crate::diag::Diags;
use crate::yaml::Node;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode { Check, Run }
pub fn from_node<T: serde::de::DeserializeOwned>(_node: &Node, _mode: Mode, _diags: &mut Diags) -> Option<T> { todo!() }
