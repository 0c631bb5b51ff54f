//! The validated plan: an immutable DAG of steps, shareable across runs.
//!
//! Runtime state (outputs, statuses, cancellation) lives in the executor, never here, so a
//! plan can be printed (`--dry-run`, `pipe graph`) or run many times (the scheduler).

use crate::diag::Pos;
use crate::model::{ConnectionSpec, Integration, SandboxBlock, ScheduleConfig, StepSpec};
use crate::params::ParamSpec;
use crate::step::{StaticInfo, StepKind};
use crate::yaml::Node;
use indexmap::IndexMap;
use petgraph::graph::{DiGraph, NodeIndex};
use std::path::PathBuf;

pub struct PlanStep {
    pub id: String,
    pub spec: StepSpec,
    pub kind: StepKind,
    /// The unrendered `with:` node (an empty mapping when absent).
    pub config: Node,
    pub info: StaticInfo,
    /// Indexes (into [`Plan::steps`]) of the steps this one waits for.
    pub deps: Vec<usize>,
    pub pos: Pos,
}

pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    pub file: PathBuf,
    pub params: IndexMap<String, ParamSpec>,
    pub connections: IndexMap<String, ConnectionSpec>,
    /// Connection nodes, unrendered, by name.
    pub connection_nodes: IndexMap<String, Node>,
    /// The validated `schedule:` (defaults applied); the `scheduler` crate turns it into
    /// fire times.
    pub schedule: Option<ScheduleConfig>,
    /// The validated `integration:` block (its defaults when the file has none).
    pub integration: Integration,
    pub concurrency: Option<u32>,
    /// `keep_tables:`: each step's table is written as Parquet in the run folder.
    pub keep_tables: bool,
    /// What `--sandbox` uses for secrets and env (unrendered templates over `sandbox`).
    pub sandbox: SandboxBlock,
    /// In a topological order (file order among independent steps).
    pub steps: Vec<PlanStep>,
    pub graph: DiGraph<String, ()>,
    /// How `foreach` steps combine their items' tables (from the registry).
    pub table_ops: Option<std::sync::Arc<dyn crate::step::TableOps>>,
}

impl Plan {
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
    pub fn node(&self, i: usize) -> NodeIndex {
        NodeIndex::new(i)
    }
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.schedule
            .as_ref()
            .map(|s| s.timezone)
            .unwrap_or(chrono_tz::UTC)
    }

    /// Mermaid flowchart of the DAG.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("flowchart TD\n");
        for s in &self.steps {
            out.push_str(&format!("  {}[\"{} ({})\"]\n", s.id, s.id, s.kind.name));
        }
        for s in &self.steps {
            for &d in &s.deps {
                let arrow = if s.spec.always { "-.->" } else { "-->" };
                out.push_str(&format!("  {} {arrow} {}\n", self.steps[d].id, s.id));
            }
        }
        out
    }

    /// Graphviz dot of the DAG.
    pub fn dot(&self) -> String {
        let mut out = format!("digraph \"{}\" {{\n  rankdir=TB;\n", self.name);
        for s in &self.steps {
            out.push_str(&format!(
                "  \"{}\" [label=\"{}\\n{}\"];\n",
                s.id, s.id, s.kind.name
            ));
        }
        for s in &self.steps {
            for &d in &s.deps {
                let style = if s.spec.always { " [style=dashed]" } else { "" };
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\"{style};\n",
                    self.steps[d].id, s.id
                ));
            }
        }
        out.push_str("}\n");
        out
    }
}
