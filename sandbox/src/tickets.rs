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
use serde::{Serialize, Serializer};
use std::fmt;
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
pub(crate) const FIRST_NUMBER: u64 = 10_001;

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

    /// The total number of matching tickets and the indices of `limit` of them after the
    /// first `skip`.
    pub fn slice(&self, q: &Query, skip: usize, limit: usize) -> (usize, Vec<usize>) {
        let (lo, hi) = if q.by_solved {
            (0, self.n)
        } else {
            let lo = q.start.map_or(0, |s| self.lower_bound(s));
            let hi = q
                .end
                .map_or(self.n, |e| self.lower_bound(e.saturating_add(1)));
            (lo, hi.max(lo))
        };
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

    /// Append ticket `i`, as the API returns it, to `out` as JSON. Typed structs
    /// serialized straight into the page's buffer: no `Value` tree, no per-ticket string.
    pub fn write_ticket(&self, i: usize, out: &mut Vec<u8>) {
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
        let prefix = CLIENT_PREFIXES[c.client / CLIENT_SUFFIXES.len()];
        let client_parts = [
            prefix,
            " ",
            CLIENT_SUFFIXES[c.client % CLIENT_SUFFIXES.len()],
            " ",
            if c.client.is_multiple_of(3) {
                "S.A."
            } else {
                "Ltda"
            },
        ];
        let client_name = Concat(&client_parts);
        let hr = self.h(T_REQUESTOR, i);
        let (fi, li) = ((hr % 12) as usize, ((hr >> 8) % 8) as usize);
        let requestor_parts = [FIRST_NAMES[fi], " ", LAST_NAMES[li]];
        let requestor_name = Concat(&requestor_parts);
        let ha = self.h(T_AGENT, i);
        let responsible = if c.status == 1 && ha.is_multiple_of(2) {
            None
        } else {
            Some(Agent::of(ha >> 4))
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
        let mut tags: Vec<&str> = Vec::with_capacity(2);
        for k in 0..(ht % 3) {
            let t = TAGS[((ht >> (8 + 8 * k)) % TAGS.len() as u64) as usize];
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let hf = self.h(T_FOLLOWERS, i);
        let followers: Vec<Agent> = (0..(hf % 3))
            .map(|k| Agent::of((hf >> (8 + 8 * k)) & 0xff))
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
        let ticket = Ticket {
            ticket_number: number,
            title,
            description: Description {
                title,
                requestor: &requestor_name,
                client: &client_name,
            },
            is_closed: c.closed.is_some(),
            created_at: LocalTime(c.created),
            updated_at: LocalTime(updated),
            closed_at: c.closed.map(LocalTime),
            status: Status {
                id: status.0,
                name: status.1,
                default_open: status.2,
            },
            stage: Stage {
                id: desk.0 * 10 + stage_no,
                name: stage_name,
                first_stage: stage_no == 1,
                last_stage: stage_no == 4,
            },
            priority: IdName {
                id: priority.0,
                name: priority.1,
            },
            desk: IdName {
                id: desk.0,
                name: desk.1,
            },
            client: IdName {
                id: c.client_id(),
                name: &client_name,
            },
            responsible,
            requestor: Requestor {
                name: &requestor_name,
                email: Email {
                    first: FIRST_SLUGS[fi],
                    last: LAST_SLUGS[li],
                    prefix,
                    suffix: CLIENT_SLUGS[c.client % CLIENT_SUFFIXES.len()],
                },
            },
            services_catalog: ServiceRef {
                id: svc.0,
                name: svc.1,
                area: IdName {
                    id: svc.2,
                    name: svc.3,
                },
            },
            sla_info: Sla {
                attend_expiration: LocalTime(attend),
                solve_expiration: LocalTime(solve),
                solved_in_time: c.closed.map(|t| t <= solve),
                stopped: stage_no == 3,
            },
            tags,
            followers,
            worked_hours: quarters as f64 / 4.0,
            reopen_count: reopen,
        };
        serde_json::to_writer(out, &ticket).expect("writing to a Vec cannot fail");
    }
}

const LAST_SLUGS: [&str; 8] = [
    "silva", "souza", "oliveira", "pereira", "costa", "almeida", "ferreira", "ribeiro",
];

/// Strings written one after the other, as one JSON string.
struct Concat<'a>(&'a [&'a str]);

impl fmt::Display for Concat<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|s| f.write_str(s))
    }
}

impl Serialize for Concat<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `{title}. Chamado aberto por {requestor} ({client}).`
struct Description<'a> {
    title: &'a str,
    requestor: &'a Concat<'a>,
    client: &'a Concat<'a>,
}

impl fmt::Display for Description<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}. Chamado aberto por {} ({}).",
            self.title, self.requestor, self.client
        )
    }
}

impl Serialize for Description<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `{first}.{last}@{prefix without spaces, lowercase}{suffix}.com.br`
struct Email<'a> {
    first: &'a str,
    last: &'a str,
    prefix: &'a str,
    suffix: &'a str,
}

impl fmt::Display for Email<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@", self.first, self.last)?;
        for ch in self.prefix.chars().filter(|c| *c != ' ') {
            for l in ch.to_lowercase() {
                fmt::Write::write_char(f, l)?;
            }
        }
        write!(f, "{}.com.br", self.suffix)
    }
}

impl Serialize for Email<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// RFC 3339 with the help desk's `-03:00` offset, seconds precision (as [`local_time`]),
/// formatted without allocating.
struct LocalTime(i64);

impl Serialize for LocalTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let buf = format_local(self.0);
        s.serialize_str(std::str::from_utf8(&buf).expect("ascii"))
    }
}

/// `YYYY-MM-DDTHH:MM:SS-03:00` for years 0..=9999.
fn format_local(secs: i64) -> [u8; 25] {
    let t = secs - 3 * 3600;
    let (days, sod) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut b = *b"0000-00-00T00:00:00-03:00";
    let mut put = |at: usize, v: i64, width: usize| {
        let mut v = v;
        for k in (0..width).rev() {
            b[at + k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, sod / 3600, 2);
    put(14, sod / 60 % 60, 2);
    put(17, sod % 60, 2);
    b
}

#[derive(Serialize)]
struct Ticket<'a> {
    ticket_number: u64,
    title: &'a str,
    description: Description<'a>,
    is_closed: bool,
    created_at: LocalTime,
    updated_at: LocalTime,
    closed_at: Option<LocalTime>,
    status: Status<'a>,
    stage: Stage<'a>,
    priority: IdName<&'a str>,
    desk: IdName<&'a str>,
    client: IdName<&'a Concat<'a>>,
    responsible: Option<Agent>,
    requestor: Requestor<'a>,
    services_catalog: ServiceRef<'a>,
    sla_info: Sla,
    tags: Vec<&'a str>,
    followers: Vec<Agent>,
    worked_hours: f64,
    reopen_count: u64,
}

#[derive(Serialize)]
struct Status<'a> {
    id: u64,
    name: &'a str,
    default_open: bool,
}

#[derive(Serialize)]
struct Stage<'a> {
    id: u64,
    name: &'a str,
    first_stage: bool,
    last_stage: bool,
}

#[derive(Serialize)]
struct IdName<N: Serialize> {
    id: u64,
    name: N,
}

#[derive(Serialize)]
struct Requestor<'a> {
    name: &'a Concat<'a>,
    email: Email<'a>,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    id: u64,
    name: &'a str,
    area: IdName<&'a str>,
}

#[derive(Serialize)]
struct Sla {
    attend_expiration: LocalTime,
    solve_expiration: LocalTime,
    solved_in_time: Option<bool>,
    stopped: bool,
}

/// An agent, `{"id", "name", "email"}`.
#[derive(Serialize)]
struct Agent {
    id: u64,
    name: &'static str,
    email: AgentEmail,
}

/// `{login}@helpdesk.example.com`
struct AgentEmail(&'static str);

impl Serialize for AgentEmail {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}@helpdesk.example.com", self.0))
    }
}

impl Agent {
    fn of(k: u64) -> Self {
        let a = &AGENTS[(k % AGENTS.len() as u64) as usize];
        Agent {
            id: a.0,
            name: a.1,
            email: AgentEmail(a.2),
        }
    }
}
