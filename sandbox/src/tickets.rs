//! Deterministic, lazily generated help-desk tickets.
//!
//! Ticket `i` (0-based) is a pure function of (seed, i): nothing is stored, so a fake
//! with a million tickets starts instantly and any page costs only its own tickets.
//! `created_at` grows with the ticket number (as in a real help desk, numbers are
//! assigned in order), spread over the 365 days before the anchor; that makes a
//! `created_at` window a binary search. Other filters scan the window once per query
//! shape and cache the matching indices.

use crate::{hash, unit};
use chrono::{DateTime, FixedOffset, SecondsFormat, TimeZone, Utc};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const T_CREATED: u64 = 1;
const T_STATUS: u64 = 2;
const T_CLOSE: u64 = 3;
const T_UPDATE: u64 = 4;
const T_SERVICE: u64 = 5;
const T_CLIENT: u64 = 6;
const T_PRIORITY: u64 = 7;
const T_AGENT: u64 = 8;
const T_REQUESTOR: u64 = 9;
const T_TAGS: u64 = 10;
const T_FOLLOWERS: u64 = 11;
const T_HOURS: u64 = 12;
const T_REOPEN: u64 = 13;
const T_TITLE: u64 = 14;

/// The first ticket's number.
const FIRST_NUMBER: u64 = 10_001;

/// (id, name, area id, area name, desk index, titles)
type Service = (
    u64,
    &'static str,
    u64,
    &'static str,
    usize,
    [&'static str; 3],
);
const SERVICES: [Service; 7] = [
    (
        11,
        "Acesso e permissões",
        1,
        "Infraestrutura",
        0,
        [
            "Usuário sem acesso ao sistema",
            "Senha bloqueada",
            "Liberar acesso à pasta compartilhada",
        ],
    ),
    (
        12,
        "Erro em sistema",
        2,
        "Sistemas",
        1,
        [
            "Erro ao emitir pedido no ERP",
            "Tela trava ao salvar cadastro",
            "Integração com o e-commerce parou",
        ],
    ),
    (
        13,
        "Instalação de software",
        1,
        "Infraestrutura",
        0,
        [
            "Instalar pacote Office",
            "Atualizar versão do ERP",
            "Instalar certificado digital",
        ],
    ),
    (
        14,
        "Nota fiscal",
        3,
        "Financeiro",
        3,
        [
            "NF-e rejeitada pela SEFAZ",
            "Boleto com valor divergente",
            "Cancelar nota fiscal emitida",
        ],
    ),
    (
        15,
        "Relatórios",
        2,
        "Sistemas",
        1,
        [
            "Relatório de vendas não carrega",
            "Criar relatório de estoque",
            "Exportação para Excel com erro",
        ],
    ),
    (
        16,
        "Rede e VPN",
        1,
        "Infraestrutura",
        2,
        [
            "VPN não conecta",
            "Internet lenta na filial",
            "Impressora de rede offline",
        ],
    ),
    (
        17,
        "Dúvida de uso",
        4,
        "Suporte",
        0,
        [
            "Como gerar segunda via",
            "Dúvida sobre fechamento mensal",
            "Como cadastrar novo produto",
        ],
    ),
];

const DESKS: [(u64, &str); 4] = [
    (1, "Suporte N1"),
    (2, "Suporte N2"),
    (3, "Infraestrutura"),
    (4, "Financeiro"),
];

const STATUSES: [(u64, &str, bool); 4] = [
    (1, "Aberto", true),
    (2, "Em atendimento", false),
    (3, "Resolvido", false),
    (4, "Cancelado", false),
];

/// (id, name, hours to attend)
const PRIORITIES: [(u64, &str, i64); 4] = [
    (1, "Baixa", 24),
    (2, "Média", 8),
    (3, "Alta", 4),
    (4, "Urgente", 1),
];

const CLIENT_PREFIXES: [&str; 10] = [
    "Alfa",
    "Horizonte",
    "Vale Verde",
    "Nova Era",
    "Prime",
    "Atlantica",
    "Serra Azul",
    "Delta",
    "Sol Nascente",
    "Pioneira",
];
const CLIENT_SUFFIXES: [&str; 6] = [
    "Logística",
    "Alimentos",
    "Engenharia",
    "Tecnologia",
    "Varejo",
    "Saúde",
];
const CLIENT_SLUGS: [&str; 6] = [
    "logistica",
    "alimentos",
    "engenharia",
    "tecnologia",
    "varejo",
    "saude",
];

const FIRST_NAMES: [&str; 12] = [
    "Ana", "Bruno", "Carla", "Diego", "Eduarda", "Felipe", "Gabriela", "Henrique", "Isabela",
    "João", "Larissa", "Marcos",
];
const FIRST_SLUGS: [&str; 12] = [
    "ana", "bruno", "carla", "diego", "eduarda", "felipe", "gabriela", "henrique", "isabela",
    "joao", "larissa", "marcos",
];
const LAST_NAMES: [&str; 8] = [
    "Silva", "Souza", "Oliveira", "Pereira", "Costa", "Almeida", "Ferreira", "Ribeiro",
];

const AGENTS: [(u64, &str, &str); 10] = [
    (501, "Rafael Mendes", "rafael.mendes"),
    (502, "Patrícia Lima", "patricia.lima"),
    (503, "Thiago Rocha", "thiago.rocha"),
    (504, "Juliana Castro", "juliana.castro"),
    (505, "Leonardo Dias", "leonardo.dias"),
    (506, "Camila Nunes", "camila.nunes"),
    (507, "Gustavo Barros", "gustavo.barros"),
    (508, "Fernanda Melo", "fernanda.melo"),
    (509, "Ricardo Teixeira", "ricardo.teixeira"),
    (510, "Vanessa Cardoso", "vanessa.cardoso"),
];

const TAGS: [&str; 7] = [
    "urgente",
    "vip",
    "erp",
    "rede",
    "financeiro",
    "retorno",
    "recorrente",
];

/// What filters need of a ticket, cheap to compute.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Core {
    pub created: i64,
    pub status: u64,
    pub closed: Option<i64>,
    pub service: usize,
    pub client: usize,
}

impl Core {
    pub fn desk_id(&self) -> u64 {
        DESKS[SERVICES[self.service].4].0
    }
    pub fn client_id(&self) -> u64 {
        100 + self.client as u64
    }
}

/// `filter_by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Filter {
    All,
    Open,
    Closed,
    Canceled,
}

/// A parsed tickets query, minus paging.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Query {
    pub filter: Filter,
    /// Filter on closed_at instead of created_at (`date_type=solved_in_time`).
    pub by_solved: bool,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub desk_ids: Option<Vec<u64>>,
    pub client_ids: Option<Vec<u64>>,
}

pub(crate) struct Generator {
    seed: u64,
    n: usize,
    start: i64,
    span: i64,
    anchor: i64,
    cache: Mutex<Vec<(Query, Arc<Vec<u32>>)>>,
}

fn tz() -> FixedOffset {
    FixedOffset::west_opt(3 * 3600).expect("valid offset")
}

/// RFC 3339 with the help desk's `-03:00` offset, seconds precision.
pub(crate) fn local_time(secs: i64) -> String {
    tz().timestamp_opt(secs, 0)
        .single()
        .expect("in range")
        .to_rfc3339_opts(SecondsFormat::Secs, false)
}

impl Generator {
    pub fn new(seed: u64, n: usize, anchor: DateTime<Utc>) -> Self {
        let span = 365 * 86_400;
        let anchor = anchor.timestamp();
        Generator {
            seed,
            n,
            start: anchor - span,
            span,
            anchor,
            cache: Mutex::new(Vec::new()),
        }
    }

    fn h(&self, tag: u64, i: usize) -> u64 {
        hash(self.seed, &[tag, i as u64])
    }

    /// Non-decreasing in `i`: floor((i + j) * span / n) with j in [0, 1).
    fn created(&self, i: usize) -> i64 {
        let j = unit(self.h(T_CREATED, i));
        self.start + ((i as f64 + j) * self.span as f64 / self.n as f64) as i64
    }

    /// The first index whose created_at is >= t.
    fn lower_bound(&self, t: i64) -> usize {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.created(mid) < t {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    pub fn core(&self, i: usize) -> Core {
        let created = self.created(i);
        let age = self.anchor - created;
        let p_closed = match age {
            a if a > 30 * 86_400 => 0.96,
            a if a > 7 * 86_400 => 0.8,
            a if a > 86_400 => 0.55,
            _ => 0.2,
        };
        let hs = self.h(T_STATUS, i);
        let status = if unit(hs) < p_closed {
            if hs % 100 < 8 {
                4
            } else {
                3
            }
        } else if hs % 10 < 6 {
            1
        } else {
            2
        };
        let closed = (status >= 3).then(|| {
            let max = (age - 60).max(60);
            let hc = self.h(T_CLOSE, i);
            // Mostly hours, sometimes days.
            let dur = if hc.is_multiple_of(4) {
                86_400 + (hc >> 8) as i64 % (10 * 86_400)
            } else {
                600 + (hc >> 8) as i64 % (8 * 3600)
            };
            created + dur.min(max)
        });
        Core {
            created,
            status,
            closed,
            service: (self.h(T_SERVICE, i) % SERVICES.len() as u64) as usize,
            client: (self.h(T_CLIENT, i) % (CLIENT_PREFIXES.len() * CLIENT_SUFFIXES.len()) as u64)
                as usize,
        }
    }

    fn matches(&self, q: &Query, c: &Core) -> bool {
        let status_ok = match q.filter {
            Filter::All => true,
            Filter::Open => c.status <= 2,
            Filter::Closed => c.status == 3,
            Filter::Canceled => c.status == 4,
        };
        let date_ok = if q.by_solved {
            c.closed
                .is_some_and(|t| q.start.is_none_or(|s| t >= s) && q.end.is_none_or(|e| t <= e))
        } else {
            true
        };
        status_ok
            && date_ok
            && q.desk_ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&c.desk_id()))
            && q.client_ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&c.client_id()))
    }

    /// The total number of matching tickets and the indices of page `page` (1-based).
    pub fn page(&self, q: &Query, page: usize, limit: usize) -> (usize, Vec<usize>) {
        let (lo, hi) = if q.by_solved {
            (0, self.n)
        } else {
            let lo = q.start.map_or(0, |s| self.lower_bound(s));
            let hi = q
                .end
                .map_or(self.n, |e| self.lower_bound(e.saturating_add(1)));
            (lo, hi.max(lo))
        };
        let skip = (page - 1).saturating_mul(limit);
        let plain = q.filter == Filter::All
            && !q.by_solved
            && q.desk_ids.is_none()
            && q.client_ids.is_none();
        if plain {
            let total = hi - lo;
            let from = lo.saturating_add(skip).min(hi);
            let to = from.saturating_add(limit).min(hi);
            return (total, (from..to).collect());
        }
        let matching = self.matching(q, lo, hi);
        let from = skip.min(matching.len());
        let to = from.saturating_add(limit).min(matching.len());
        (
            matching.len(),
            matching[from..to].iter().map(|&i| i as usize).collect(),
        )
    }

    fn matching(&self, q: &Query, lo: usize, hi: usize) -> Arc<Vec<u32>> {
        if let Some((_, v)) = self.cache.lock().unwrap().iter().find(|(k, _)| k == q) {
            return v.clone();
        }
        let v: Arc<Vec<u32>> = Arc::new(
            (lo..hi)
                .filter(|&i| self.matches(q, &self.core(i)))
                .map(|i| i as u32)
                .collect(),
        );
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= 16 {
            cache.remove(0);
        }
        cache.push((q.clone(), v.clone()));
        v
    }

    /// The full ticket `i`, as the API returns it.
    pub fn ticket(&self, i: usize) -> Value {
        let c = self.core(i);
        let number = FIRST_NUMBER + i as u64;
        let svc = &SERVICES[c.service];
        let desk = DESKS[svc.4];
        let status = STATUSES[(c.status - 1) as usize];
        let hp = self.h(T_PRIORITY, i) % 100;
        let priority = PRIORITIES[match hp {
            0..30 => 0,
            30..70 => 1,
            70..92 => 2,
            _ => 3,
        }];
        let title = svc.5[(self.h(T_TITLE, i) % 3) as usize];
        let client_name = format!(
            "{} {} {}",
            CLIENT_PREFIXES[c.client / CLIENT_SUFFIXES.len()],
            CLIENT_SUFFIXES[c.client % CLIENT_SUFFIXES.len()],
            if c.client.is_multiple_of(3) {
                "S.A."
            } else {
                "Ltda"
            }
        );
        let domain = format!(
            "{}{}.com.br",
            CLIENT_PREFIXES[c.client / CLIENT_SUFFIXES.len()]
                .to_lowercase()
                .replace(' ', ""),
            CLIENT_SLUGS[c.client % CLIENT_SUFFIXES.len()]
        );
        let hr = self.h(T_REQUESTOR, i);
        let (fi, li) = ((hr % 12) as usize, ((hr >> 8) % 8) as usize);
        let requestor = json!({
            "name": format!("{} {}", FIRST_NAMES[fi], LAST_NAMES[li]),
            "email": format!("{}.{}@{}", FIRST_SLUGS[fi], LAST_NAMES[li].to_lowercase(), domain),
        });
        let agent = |k: u64| {
            let a = AGENTS[(k % AGENTS.len() as u64) as usize];
            json!({"id": a.0, "name": a.1, "email": format!("{}@helpdesk.example.com", a.2)})
        };
        let ha = self.h(T_AGENT, i);
        let responsible = if c.status == 1 && ha.is_multiple_of(2) {
            Value::Null
        } else {
            agent(ha >> 4)
        };
        let (stage_no, stage_name) = match c.status {
            1 => (1, "Triagem"),
            2 if ha.is_multiple_of(3) => (3, "Aguardando cliente"),
            2 => (2, "Em atendimento"),
            _ => (4, "Finalizado"),
        };
        let updated = match c.closed {
            Some(t) => t,
            None => {
                c.created + ((self.anchor - c.created) as f64 * unit(self.h(T_UPDATE, i))) as i64
            }
        };
        let attend = c.created + priority.2 * 3600;
        let solve = c.created + priority.2 * 4 * 3600;
        let ht = self.h(T_TAGS, i);
        let tags: Vec<&str> = (0..(ht % 3))
            .map(|k| TAGS[((ht >> (8 + 8 * k)) % TAGS.len() as u64) as usize])
            .fold(Vec::new(), |mut v, t| {
                if !v.contains(&t) {
                    v.push(t)
                }
                v
            });
        let hf = self.h(T_FOLLOWERS, i);
        let followers: Vec<Value> = (0..(hf % 3))
            .map(|k| agent((hf >> (8 + 8 * k)) & 0xff))
            .collect();
        let hh = self.h(T_HOURS, i);
        let quarters = match c.status {
            1 => 0,
            2 => 1 + hh % 24,
            4 => hh % 4,
            _ => 1 + hh % 160,
        };
        let hro = self.h(T_REOPEN, i) % 100;
        let reopen = if c.status == 3 && hro < 8 {
            1 + hro.is_multiple_of(4) as u64
        } else {
            0
        };
        json!({
            "ticket_number": number,
            "title": title,
            "description": format!("{title}. Chamado aberto por {} ({client_name}).", requestor["name"].as_str().unwrap_or_default()),
            "is_closed": c.closed.is_some(),
            "created_at": local_time(c.created),
            "updated_at": local_time(updated),
            "closed_at": c.closed.map(local_time),
            "status": {"id": status.0, "name": status.1, "default_open": status.2},
            "stage": {"id": desk.0 * 10 + stage_no, "name": stage_name, "first_stage": stage_no == 1, "last_stage": stage_no == 4},
            "priority": {"id": priority.0, "name": priority.1},
            "desk": {"id": desk.0, "name": desk.1},
            "client": {"id": c.client_id(), "name": client_name},
            "responsible": responsible,
            "requestor": requestor,
            "services_catalog": {"id": svc.0, "name": svc.1, "area": {"id": svc.2, "name": svc.3}},
            "sla_info": {
                "attend_expiration": local_time(attend),
                "solve_expiration": local_time(solve),
                "solved_in_time": c.closed.map(|t| t <= solve),
                "stopped": stage_no == 3,
            },
            "tags": tags,
            "followers": followers,
            "worked_hours": quarters as f64 / 4.0,
            "reopen_count": reopen,
        })
    }
}

#[cfg(test)]
mod perf_tmp {
    use super::*;
    #[test]
    #[ignore]
    fn perf_tmp_golden() {
        for seed in [1u64, 42, 7] {
            let anchor = Utc.with_ymd_and_hms(2025, 11, 25, 12, 0, 0).unwrap();
            let g = Generator::new(seed, 100_000, anchor);
            let t = std::time::Instant::now();
            let mut all = Vec::new();
            for p in 0..500 {
                let mut body = String::from("[");
                for i in p * 200..(p + 1) * 200 {
                    if i > p * 200 {
                        body.push(',');
                    }
                    body.push_str(&g.ticket(i).to_string());
                }
                body.push(']');
                if seed == 42 && p == 0 {
                    std::fs::write("/tmp/page.json", &body).unwrap();
                }
                all.extend_from_slice(body.as_bytes());
            }
            eprintln!("seed {seed}: {:?} per page", t.elapsed() / 500);
            let path = format!("/tmp/golden-{seed}.json");
            if std::path::Path::new(&path).exists() {
                assert!(std::fs::read(&path).unwrap() == all, "seed {seed} differs");
                eprintln!("seed {seed}: identical");
            } else {
                std::fs::write(&path, &all).unwrap();
            }
        }
    }
}
