//! The run page's DAG, laid out on the server: each step in the layer of its longest path
//! from a root (so every edge goes left to right), steps of a layer stacked in file order;
//! the template draws it as SVG, each node with its step's status as a CSS class.

use crate::api::integrations::Graph;
use serde::Serialize;
use std::collections::HashMap;

pub const NODE_W: i64 = 168;
pub const NODE_H: i64 = 40;
const GAP_X: i64 = 56;
const GAP_Y: i64 = 16;
const PAD: i64 = 8;
/// Characters of a step id shown in its box (the whole id is its tooltip).
const LABEL: usize = 20;

#[derive(Serialize)]
pub struct Layout {
    pub width: i64,
    pub height: i64,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

#[derive(Serialize)]
pub struct Node {
    pub id: String,
    pub label: String,
    pub kind: String,
    pub status: String,
    pub x: i64,
    pub y: i64,
    /// Where its texts go.
    pub tx: i64,
    pub ty: i64,
    pub ty2: i64,
}

#[derive(Serialize)]
pub struct Edge {
    /// An SVG path (a cubic curve from the right of `from` to the left of `to`).
    pub d: String,
}

/// Lay out `graph`; `status` gives each step's status (`pending` when absent).
pub fn layout(graph: &Graph, status: &HashMap<String, String>) -> Layout {
    let index: HashMap<&str, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let n = graph.nodes.len();
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); n];
    for e in &graph.edges {
        if let (Some(&f), Some(&t)) = (index.get(e.from.as_str()), index.get(e.to.as_str())) {
            preds[t].push(f);
        }
    }
    // Longest path from a root, by relaxation (a DAG: at most n rounds).
    let mut layer = vec![0usize; n];
    for _ in 0..n {
        let mut changed = false;
        for t in 0..n {
            for &f in &preds[t] {
                if layer[f] + 1 > layer[t] && layer[f] < n {
                    layer[t] = layer[f] + 1;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut row_in_layer = vec![0usize; n];
    let mut count: HashMap<usize, usize> = HashMap::new();
    for (i, l) in layer.iter().enumerate() {
        let c = count.entry(*l).or_default();
        row_in_layer[i] = *c;
        *c += 1;
    }
    let layers = layer.iter().max().map_or(0, |m| m + 1) as i64;
    let rows = count.values().max().copied().unwrap_or(0) as i64;
    let pos = |i: usize| {
        (
            PAD + layer[i] as i64 * (NODE_W + GAP_X),
            PAD + row_in_layer[i] as i64 * (NODE_H + GAP_Y),
        )
    };
    let nodes = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let (x, y) = pos(i);
            let label = if g.id.chars().count() > LABEL {
                format!("{}…", g.id.chars().take(LABEL - 1).collect::<String>())
            } else {
                g.id.clone()
            };
            Node {
                id: g.id.clone(),
                label,
                kind: g.kind.clone(),
                status: status
                    .get(&g.id)
                    .cloned()
                    .unwrap_or_else(|| "pending".into()),
                x,
                y,
                tx: x + 10,
                ty: y + 17,
                ty2: y + 32,
            }
        })
        .collect();
    let edges = graph
        .edges
        .iter()
        .filter_map(|e| {
            let (fx, fy) = pos(*index.get(e.from.as_str())?);
            let (tx, ty) = pos(*index.get(e.to.as_str())?);
            let (x1, y1) = (fx + NODE_W, fy + NODE_H / 2);
            let (x2, y2) = (tx, ty + NODE_H / 2);
            let mid = (x1 + x2) / 2;
            Some(Edge {
                d: format!("M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"),
            })
        })
        .collect();
    Layout {
        width: (PAD * 2 + layers * (NODE_W + GAP_X) - GAP_X).max(NODE_W),
        height: (PAD * 2 + rows * (NODE_H + GAP_Y) - GAP_Y).max(NODE_H),
        nodes,
        edges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::integrations::{GraphEdge, GraphNode};

    fn node(id: &str) -> GraphNode {
        GraphNode {
            id: id.into(),
            kind: "log".into(),
            always: false,
        }
    }

    #[test]
    fn layers_follow_the_longest_path() {
        let edge = |f: &str, t: &str| GraphEdge {
            from: f.into(),
            to: t.into(),
        };
        let g = Graph {
            nodes: vec![node("a"), node("b"), node("c"), node("d")],
            edges: vec![
                edge("a", "b"),
                edge("b", "c"),
                edge("a", "c"),
                edge("c", "d"),
            ],
        };
        let l = layout(
            &g,
            &HashMap::from([("a".to_string(), "succeeded".to_string())]),
        );
        let x: Vec<i64> = l.nodes.iter().map(|n| n.x).collect();
        assert!(x[0] < x[1] && x[1] < x[2] && x[2] < x[3], "{x:?}");
        assert_eq!(l.nodes[0].status, "succeeded");
        assert_eq!(l.nodes[1].status, "pending");
        assert_eq!(l.edges.len(), 4);
    }
}
