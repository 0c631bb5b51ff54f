//! The Sheets v4 calls beyond `values.get` / `values.update`, as real clients make them:
//!
//! - `spreadsheets.get` (gspread's `open_by_key` and `worksheet('OTP')` read it first):
//!   the spreadsheet's properties and tabs, `includeGridData` with `ranges`, and the
//!   `fields` mask;
//! - `spreadsheets.batchUpdate` with `addSheet`, `deleteSheet` and `updateSheetProperties`
//!   (gspread's `add_worksheet`, `del_worksheet`, `update_title`, `resize`), atomic like
//!   Google's: one refused request changes nothing;
//! - `values:append` (OVERWRITE and INSERT_ROWS after the range's table), `values:clear`,
//!   `values:batchGet`, `values:batchClear`, `values:batchUpdate` (atomic).
//!
//! Every failure is Google's JSON error, and a Sheets call the fake does not serve is
//! refused with a 400 that says so, never answered with an empty body.

use super::{
    a1, bad_range, bounds, check, google_error, include_option, input_option, is_empty,
    other_cells, parse_range, read_range, render_options, update_values, values_of, Range, Render,
    Tab, GRID_COLS, GRID_ROWS, MAX_CELLS,
};
use crate::{hash_str, Shared};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Nesting a `fields` mask may have; deeper is refused (a hostile mask cannot recurse far).
const MAX_MASK_DEPTH: usize = 16;
/// Tabs one spreadsheet may hold (Google's grid limit comes first in practice).
const MAX_TABS: usize = 200;

/// The query's pairs in order, repeated names kept (`ranges=A1&ranges=B2`).
fn pairs(q: &Option<String>) -> Vec<(String, String)> {
    serde_urlencoded::from_str(q.as_deref().unwrap_or("")).unwrap_or_default()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn all<'a>(q: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    q.iter()
        .filter(move |(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A boolean query parameter as Google parses it (any case: requests sends `True`).
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn flag(q: &[(String, String)], name: &str, field: &str) -> Result<bool, Response> {
    match param(q, name) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(bad(&format!(
            "Invalid value at '{field}' (TYPE_BOOL), \"{v}\""
        ))),
    }
}

fn bad(message: &str) -> Response {
    google_error(StatusCode::BAD_REQUEST, message)
}

fn method_not_found() -> Response {
    google_error(StatusCode::NOT_FOUND, "Method not found.")
}

/// A Sheets method Google has and the fake does not: a loud 400, never a quiet success.
fn not_supported(what: &str) -> Response {
    bad(&format!(
        "{what} is not supported by the pipe sandbox's Sheets fake (it serves spreadsheets.get, \
         spreadsheets.batchUpdate with addSheet/deleteSheet/updateSheetProperties, and \
         values get/update/append/clear/batchGet/batchClear/batchUpdate)"
    ))
}

#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn json_body(body: &Bytes) -> Result<Value, Response> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| bad("Invalid JSON payload received."))
}

/// A tab's `SheetProperties`.
fn properties(tab: &Tab, index: usize) -> Value {
    json!({
        "sheetId": tab.id,
        "title": tab.title,
        "index": index,
        "sheetType": "GRID",
        "gridProperties": {"rowCount": tab.rows, "columnCount": tab.cols},
    })
}

/// A cell's `ExtendedValue` (`stringValue`, `numberValue`, `boolValue`).
fn extended(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!({"numberValue": n}),
        Value::Bool(b) => json!({"boolValue": b}),
        Value::String(s) => json!({"stringValue": s}),
        other => json!({"stringValue": other.to_string()}),
    }
}

/// `GridData` of `r` (bounds already checked): `rowData` of `CellData`, an empty cell `{}`,
/// trailing empty rows and cells dropped; zero offsets omitted, as proto3 JSON does.
fn grid_data(tab: &Tab, r: &Range, c2: u32, r2: u32) -> Value {
    let last_row = (tab.cells.len() as u32).min(r2 + 1);
    let mut rows: Vec<Value> = Vec::new();
    for row in r.r1..last_row.max(r.r1) {
        let cells = &tab.cells[row as usize];
        let last_col = (cells.len() as u32).min(c2 + 1);
        let mut line: Vec<Value> = (r.c1..last_col.max(r.c1))
            .map(|col| {
                let v = &cells[col as usize];
                if is_empty(v) {
                    json!({})
                } else {
                    json!({
                        "userEnteredValue": extended(v),
                        "effectiveValue": extended(v),
                        "formattedValue": super::rendered(tab, row, col, true),
                    })
                }
            })
            .collect();
        while line.last().is_some_and(|c| c == &json!({})) {
            line.pop();
        }
        rows.push(if line.is_empty() {
            json!({})
        } else {
            json!({"values": line})
        });
    }
    while rows.last().is_some_and(|r| r == &json!({})) {
        rows.pop();
    }
    let mut data = Map::new();
    if r.r1 > 0 {
        data.insert("startRow".into(), json!(r.r1));
    }
    if r.c1 > 0 {
        data.insert("startColumn".into(), json!(r.c1));
    }
    if !rows.is_empty() {
        data.insert("rowData".into(), Value::Array(rows));
    }
    Value::Object(data)
}

/// A parsed `fields` mask: each name selects that field, whole or through its sub-mask.
#[derive(Debug, PartialEq)]
enum Mask {
    Whole,
    Fields(BTreeMap<String, Mask>),
}

fn merge(into: &mut BTreeMap<String, Mask>, path: &[String], leaf: Mask) {
    let (first, rest) = path.split_first().expect("a path has a name");
    if rest.is_empty() {
        match (into.get_mut(first), leaf) {
            (Some(Mask::Whole), _) => {}
            (Some(Mask::Fields(old)), Mask::Fields(new)) => {
                for (k, v) in new {
                    merge(old, std::slice::from_ref(&k), v);
                }
            }
            (_, leaf) => {
                into.insert(first.clone(), leaf);
            }
        }
        return;
    }
    let entry = into
        .entry(first.clone())
        .or_insert_with(|| Mask::Fields(BTreeMap::new()));
    if let Mask::Fields(sub) = entry {
        merge(sub, rest, leaf);
    }
}

/// `a.b,c(d,e/f)` (Google's field-mask syntax; `/` is `.`).
fn parse_mask(s: &str) -> Option<BTreeMap<String, Mask>> {
    fn list(c: &[char], i: &mut usize, depth: usize) -> Option<BTreeMap<String, Mask>> {
        if depth > MAX_MASK_DEPTH {
            return None;
        }
        let mut tree = BTreeMap::new();
        loop {
            let mut path = Vec::new();
            loop {
                while c.get(*i) == Some(&' ') {
                    *i += 1;
                }
                let start = *i;
                while c
                    .get(*i)
                    .is_some_and(|ch| ch.is_ascii_alphanumeric() || *ch == '_' || *ch == '*')
                {
                    *i += 1;
                }
                if *i == start {
                    return None;
                }
                path.push(c[start..*i].iter().collect::<String>());
                if matches!(c.get(*i), Some('.') | Some('/')) {
                    *i += 1;
                    continue;
                }
                break;
            }
            let leaf = if c.get(*i) == Some(&'(') {
                *i += 1;
                let sub = list(c, i, depth + 1)?;
                if c.get(*i) != Some(&')') {
                    return None;
                }
                *i += 1;
                Mask::Fields(sub)
            } else {
                Mask::Whole
            };
            merge(&mut tree, &path, leaf);
            while c.get(*i) == Some(&' ') {
                *i += 1;
            }
            if c.get(*i) == Some(&',') {
                *i += 1;
                continue;
            }
            return Some(tree);
        }
    }
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let tree = list(&c, &mut i, 0)?;
    (i == c.len()).then_some(tree)
}

fn apply_mask(v: &Value, mask: &BTreeMap<String, Mask>) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|x| apply_mask(x, mask)).collect()),
        Value::Object(m) if !mask.contains_key("*") => {
            let mut out = Map::new();
            for (k, sub) in mask {
                if let Some(x) = m.get(k) {
                    out.insert(
                        k.clone(),
                        match sub {
                            Mask::Whole => x.clone(),
                            Mask::Fields(sub) => apply_mask(x, sub),
                        },
                    );
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// `GET /v4/spreadsheets/{id}`: `spreadsheets.get`.
pub(super) async fn get_spreadsheet(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&shared, &headers, &id, false) {
        return r;
    }
    let q = pairs(&q);
    let grid = match flag(&q, "includeGridData", "include_grid_data") {
        Ok(g) => g,
        Err(r) => return r,
    };
    let mask = match param(&q, "fields") {
        None | Some("") | Some("*") => None,
        Some(f) => match parse_mask(f) {
            Some(m) => Some(m),
            None => return bad(&format!("Invalid field selection {f}")),
        },
    };
    let sheets = shared.google.sheets.lock().unwrap();
    let book = &sheets[&id];
    let mut wanted: Vec<(usize, Option<(Range, String)>)> = Vec::new();
    for range in all(&q, "ranges") {
        let Some(r) = parse_range(&book.tabs, range) else {
            return bad_range(range);
        };
        wanted.push((r.tab, Some((r, range.to_string()))));
    }
    if wanted.is_empty() {
        wanted = (0..book.tabs.len()).map(|i| (i, None)).collect();
    }
    let mut out_sheets = Vec::new();
    for (index, tab) in book.tabs.iter().enumerate() {
        let of_tab: Vec<&Option<(Range, String)>> = wanted
            .iter()
            .filter(|(t, _)| *t == index)
            .map(|(_, r)| r)
            .collect();
        if of_tab.is_empty() {
            continue;
        }
        let mut sheet = json!({"properties": properties(tab, index)});
        if grid {
            let mut data = Vec::new();
            for r in of_tab {
                let (r, text) = match r {
                    Some((r, text)) => (*r, text.clone()),
                    None => (
                        Range {
                            tab: index,
                            c1: 0,
                            r1: 0,
                            c2: None,
                            r2: None,
                        },
                        tab.title.clone(),
                    ),
                };
                let (c2, r2) = match bounds(tab, &r, &text) {
                    Ok(b) => b,
                    Err(e) => return e,
                };
                data.push(grid_data(tab, &r, c2, r2));
            }
            sheet["data"] = Value::Array(data);
        }
        out_sheets.push(sheet);
    }
    let body = json!({
        "spreadsheetId": id,
        "properties": {
            "title": book.title,
            "locale": "en_US",
            "autoRecalc": "ON_CHANGE",
            "timeZone": "Etc/GMT",
        },
        "sheets": out_sheets,
        "spreadsheetUrl": format!("https://docs.google.com/spreadsheets/d/{id}/edit"),
    });
    Json(match mask {
        Some(m) => apply_mask(&body, &m),
        None => body,
    })
    .into_response()
}

/// `POST /v4/spreadsheets/{id}:batchUpdate` (the method arrives inside the id segment).
pub(super) async fn spreadsheet_method(
    State(shared): State<Arc<Shared>>,
    Path(id_method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((id, method)) = id_method.rsplit_once(':') else {
        return method_not_found();
    };
    match method {
        "batchUpdate" => {}
        "getByDataFilter" => return not_supported("spreadsheets.getByDataFilter"),
        _ => return method_not_found(),
    }
    if let Err(r) = check(&shared, &headers, id, true) {
        return r;
    }
    let body = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(requests) = body.get("requests").and_then(Value::as_array) else {
        return bad("Invalid JSON payload received. 'requests' must be a list.");
    };
    let mut sheets = shared.google.sheets.lock().unwrap();
    let book = sheets.get_mut(id).expect("checked");
    // Atomic, as Google's: the requests apply to a copy that replaces the tabs only when
    // every one of them succeeded.
    let mut tabs = book.tabs.clone();
    let mut replies = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        match batch_request(id, &mut tabs, i, request) {
            Ok(reply) => replies.push(reply),
            Err(r) => return r,
        }
    }
    book.tabs = tabs;
    Json(json!({"spreadsheetId": id, "replies": replies})).into_response()
}

/// One request of a `spreadsheets.batchUpdate`: its reply.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn batch_request(
    id: &str,
    tabs: &mut Vec<Tab>,
    i: usize,
    request: &Value,
) -> Result<Value, Response> {
    let Some((kind, args)) = request.as_object().and_then(|o| {
        let mut it = o.iter();
        match (it.next(), it.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }) else {
        return Err(bad(&format!(
            "Invalid requests[{i}]: exactly one kind of request must be set"
        )));
    };
    let invalid = |m: &str| bad(&format!("Invalid requests[{i}].{kind}: {m}"));
    let find = |tabs: &[Tab], sheet_id: &Value| {
        sheet_id
            .as_u64()
            .and_then(|sid| tabs.iter().position(|t| t.id as u64 == sid))
    };
    match kind.as_str() {
        "addSheet" => {
            if tabs.len() >= MAX_TABS {
                return Err(invalid(&format!(
                    "a spreadsheet of the sandbox holds at most {MAX_TABS} sheets"
                )));
            }
            let p = &args["properties"];
            let title = match p.get("title").and_then(Value::as_str) {
                Some(t) if !t.trim().is_empty() => t.to_string(),
                _ => (1..)
                    .map(|n| format!("Sheet{n}"))
                    .find(|t| !tabs.iter().any(|x| x.title.eq_ignore_ascii_case(t)))
                    .expect("a free name"),
            };
            if tabs.iter().any(|t| t.title.eq_ignore_ascii_case(&title)) {
                return Err(invalid(&format!(
                    "A sheet with the name \"{title}\" already exists. Please enter another name."
                )));
            }
            let dim = |name: &str, default: u32| match p["gridProperties"].get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n >= 1 && *n <= u32::MAX as u64)
                    .map(|n| n as u32)
                    .ok_or_else(|| invalid(&format!("Invalid gridProperties.{name}: {v}"))),
            };
            let (rows, cols) = (dim("rowCount", GRID_ROWS)?, dim("columnCount", GRID_COLS)?);
            let total: u64 = tabs.iter().map(Tab::grid_cells).sum();
            if total.saturating_add(rows as u64 * cols as u64) > MAX_CELLS {
                return Err(invalid(&format!(
                    "This action would increase the number of cells in the workbook above the limit of {MAX_CELLS} cells."
                )));
            }
            let sheet_id = match p.get("sheetId").and_then(Value::as_u64) {
                Some(sid) if tabs.iter().any(|t| t.id as u64 == sid) => {
                    return Err(invalid(&format!(
                        "A sheet with the id {sid} already exists."
                    )))
                }
                Some(sid) if sid <= u32::MAX as u64 => sid as u32,
                Some(sid) => return Err(invalid(&format!("Invalid sheetId: {sid}"))),
                None => {
                    // Google's ids look random; this one is a hash of the spreadsheet and
                    // title, made unique.
                    let mut sid = (hash_str(&format!("{id}/{title}")) % 2_000_000_000) as u32;
                    while tabs.iter().any(|t| t.id == sid) {
                        sid = sid.wrapping_add(1);
                    }
                    sid
                }
            };
            let index = match p.get("index").and_then(Value::as_u64) {
                Some(n) => (n as usize).min(tabs.len()),
                None => tabs.len(),
            };
            tabs.insert(
                index,
                Tab {
                    id: sheet_id,
                    title,
                    rows,
                    cols,
                    cells: Vec::new(),
                },
            );
            Ok(json!({"addSheet": {"properties": properties(&tabs[index], index)}}))
        }
        "deleteSheet" => {
            let Some(at) = find(&tabs[..], &args["sheetId"]) else {
                return Err(invalid(&format!("No grid with id: {}", args["sheetId"])));
            };
            if tabs.len() == 1 {
                return Err(invalid("You can't remove all the sheets in a document."));
            }
            tabs.remove(at);
            Ok(json!({}))
        }
        "updateSheetProperties" => {
            let p = &args["properties"];
            let Some(at) = find(&tabs[..], &p["sheetId"]) else {
                return Err(invalid(&format!("No grid with id: {}", p["sheetId"])));
            };
            let fields = args.get("fields").and_then(Value::as_str).unwrap_or("");
            if fields.trim().is_empty() {
                return Err(invalid(
                    "At least one field must be updated, but 'fields' is empty.",
                ));
            }
            for field in fields.split(',').map(|f| f.trim().replace('/', ".")) {
                match field.as_str() {
                    "title" => {
                        let Some(title) = p["title"].as_str().filter(|t| !t.trim().is_empty())
                        else {
                            return Err(invalid("The sheet title must not be empty."));
                        };
                        if tabs
                            .iter()
                            .enumerate()
                            .any(|(j, t)| j != at && t.title.eq_ignore_ascii_case(title))
                        {
                            return Err(invalid(&format!(
                                "A sheet with the name \"{title}\" already exists. Please enter another name."
                            )));
                        }
                        tabs[at].title = title.to_string();
                    }
                    "gridProperties.rowCount" | "gridProperties.columnCount" => {
                        let rows = field.ends_with("rowCount");
                        let name = if rows { "rowCount" } else { "columnCount" };
                        let Some(n) = p["gridProperties"][name]
                            .as_u64()
                            .filter(|n| *n >= 1 && *n <= u32::MAX as u64)
                        else {
                            return Err(invalid(&format!(
                                "Invalid gridProperties.{name}: {}",
                                p["gridProperties"][name]
                            )));
                        };
                        let (new_rows, new_cols) = if rows {
                            (n, tabs[at].cols as u64)
                        } else {
                            (tabs[at].rows as u64, n)
                        };
                        if other_cells(tabs, at).saturating_add(new_rows * new_cols) > MAX_CELLS {
                            return Err(invalid(&format!(
                                "This action would increase the number of cells in the workbook above the limit of {MAX_CELLS} cells."
                            )));
                        }
                        let tab = &mut tabs[at];
                        if rows {
                            tab.rows = n as u32;
                            tab.cells.truncate(n as usize);
                        } else {
                            tab.cols = n as u32;
                            for line in &mut tab.cells {
                                line.truncate(n as usize);
                            }
                        }
                    }
                    other => {
                        return Err(not_supported(&format!(
                            "updateSheetProperties of `{other}`"
                        )))
                    }
                }
            }
            Ok(json!({}))
        }
        other => Err(not_supported(&format!("The `{other}` request"))),
    }
}

/// `POST …/values/{range}:append` and `…:clear` (the method arrives inside the range).
pub(super) async fn range_method(
    State(shared): State<Arc<Shared>>,
    Path((id, range_method)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((range, method)) = range_method.rsplit_once(':') else {
        return method_not_found();
    };
    if method != "append" && method != "clear" {
        return method_not_found();
    }
    if let Err(r) = check(&shared, &headers, &id, true) {
        return r;
    }
    let q = pairs(&q);
    let body = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let result = if method == "append" {
        append(&shared, &id, range, &q, &body)
    } else {
        let mut sheets = shared.google.sheets.lock().unwrap();
        let tabs = &mut sheets.get_mut(&id).expect("checked").tabs;
        clear(tabs, range).map(|cleared| json!({"spreadsheetId": id, "clearedRange": cleared}))
    };
    match result {
        Ok(out) => Json(out).into_response(),
        Err(r) => r,
    }
}

/// Does `row` hold a value between the range's columns?
fn row_has_data(tab: &Tab, row: u32, r: &Range) -> bool {
    tab.cells.get(row as usize).is_some_and(|cells| {
        cells
            .iter()
            .enumerate()
            .any(|(c, v)| c as u32 >= r.c1 && r.c2.is_none_or(|c2| c as u32 <= c2) && !is_empty(v))
    })
}

/// `values.append`: find the range's table (the first run of rows holding values), write
/// after its last row from its first column; `INSERT_ROWS` first makes room.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn append(
    shared: &Shared,
    id: &str,
    range: &str,
    q: &[(String, String)],
    body: &Value,
) -> Result<Value, Response> {
    let user_entered = input_option(param(q, "valueInputOption"))?;
    let insert = match param(q, "insertDataOption").unwrap_or("OVERWRITE") {
        "OVERWRITE" => false,
        "INSERT_ROWS" => true,
        other => return Err(bad(&format!("Invalid value at 'insert_data_option' (type.googleapis.com/google.apps.sheets.v4.InsertDataOption), \"{other}\""))),
    };
    let include = include_option(
        param(q, "includeValuesInResponse")
            .map(|s| Value::String(s.into()))
            .as_ref(),
        param(q, "responseValueRenderOption"),
        param(q, "responseDateTimeRenderOption"),
    )?;
    let values = values_of(body, user_entered)?;
    let mut sheets = shared.google.sheets.lock().unwrap();
    let tabs = &mut sheets.get_mut(id).expect("checked").tabs;
    let Some(r) = parse_range(tabs, range) else {
        return Err(bad_range(range));
    };
    let tab = &tabs[r.tab];
    let last = (tab.cells.len() as u32).min(r.r2.map_or(u32::MAX, |r2| r2.saturating_add(1)));
    let start = (r.r1..last.max(r.r1)).find(|row| row_has_data(tab, *row, &r));
    // The table starts inside the range and runs down past it while rows hold values
    // (`append(range="A1")` appends after the whole table, as in Sheets).
    let below = Range { c2: None, ..r };
    let (anchor_row, anchor_col, table_range) = match start {
        None => (r.r1, r.c1, None),
        Some(start) => {
            let mut end = start;
            while (end as usize + 1) < tab.cells.len() && row_has_data(tab, end + 1, &below) {
                end += 1;
            }
            let cols: Vec<u32> = (start..=end)
                .flat_map(|row| {
                    tab.cells[row as usize]
                        .iter()
                        .enumerate()
                        .filter(|(c, v)| *c as u32 >= r.c1 && !is_empty(v))
                        .map(|(c, _)| c as u32)
                        .collect::<Vec<_>>()
                })
                .collect();
            let (first_col, last_col) = (
                cols.iter().copied().min().unwrap_or(r.c1),
                cols.iter().copied().max().unwrap_or(r.c1),
            );
            (
                end + 1,
                first_col,
                Some(a1(tab, first_col, start, last_col, end)),
            )
        }
    };
    let rows = values.len() as u32;
    if insert && rows > 0 {
        let budget = MAX_CELLS.saturating_sub(other_cells(tabs, r.tab));
        let tab = &mut tabs[r.tab];
        if (tab.rows as u64 + rows as u64).saturating_mul(tab.cols as u64) > budget {
            return Err(bad(&format!("This action would increase the number of cells in the workbook above the limit of {MAX_CELLS} cells.")));
        }
        if (anchor_row as usize) < tab.cells.len() {
            let below = tab.cells.split_off(anchor_row as usize);
            tab.cells
                .extend(std::iter::repeat_n(Vec::new(), rows as usize));
            tab.cells.extend(below);
        }
        tab.rows += rows;
    }
    let at = Range {
        tab: r.tab,
        c1: anchor_col,
        r1: anchor_row,
        c2: None,
        r2: None,
    };
    let updates = update_values(id, tabs, at, "", &values, include)?;
    let mut out = json!({"spreadsheetId": id, "updates": updates});
    if let Some(t) = table_range {
        out["tableRange"] = json!(t);
    }
    Ok(out)
}

/// Empty the cells of `range`: its A1 bounds.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn clear(tabs: &mut [Tab], range: &str) -> Result<String, Response> {
    let Some(r) = parse_range(tabs, range) else {
        return Err(bad_range(range));
    };
    let tab = &mut tabs[r.tab];
    let (c2, r2) = bounds(tab, &r, range)?;
    for row in r.r1..=r2.min(tab.cells.len().saturating_sub(1) as u32) {
        let Some(line) = tab.cells.get_mut(row as usize) else {
            break;
        };
        for col in r.c1..=c2 {
            if let Some(v) = line.get_mut(col as usize) {
                *v = Value::Null;
            }
        }
        while line.last().is_some_and(Value::is_null) {
            line.pop();
        }
    }
    while tab.cells.last().is_some_and(Vec::is_empty) {
        tab.cells.pop();
    }
    Ok(a1(tab, r.c1, r.r1, c2, r2))
}

/// `GET /v4/spreadsheets/{id}/values:batchGet`.
pub(super) async fn collection_get(
    State(shared): State<Arc<Shared>>,
    Path((id, method)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    if method != "values:batchGet" {
        return method_not_found();
    }
    if let Err(r) = check(&shared, &headers, &id, false) {
        return r;
    }
    let q = pairs(&q);
    let how = match render_options(
        param(&q, "majorDimension"),
        param(&q, "valueRenderOption"),
        param(&q, "dateTimeRenderOption"),
    ) {
        Ok(h) => h,
        Err(r) => return r,
    };
    let sheets = shared.google.sheets.lock().unwrap();
    let tabs = &sheets[&id].tabs;
    let mut ranges = Vec::new();
    for range in all(&q, "ranges") {
        let Some(r) = parse_range(tabs, range) else {
            return bad_range(range);
        };
        match read_range(&tabs[r.tab], &r, range, how) {
            Ok(v) => ranges.push(v),
            Err(e) => return e,
        }
    }
    let mut out = json!({"spreadsheetId": id});
    if !ranges.is_empty() {
        out["valueRanges"] = Value::Array(ranges);
    }
    Json(out).into_response()
}

/// `POST /v4/spreadsheets/{id}/values:batchClear` and `values:batchUpdate`.
pub(super) async fn collection_post(
    State(shared): State<Arc<Shared>>,
    Path((id, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match method.as_str() {
        "values:batchClear" | "values:batchUpdate" => {}
        "values:batchGetByDataFilter"
        | "values:batchClearByDataFilter"
        | "values:batchUpdateByDataFilter" => {
            return not_supported(&format!("spreadsheets.{method}"))
        }
        _ => return method_not_found(),
    }
    if let Err(r) = check(&shared, &headers, &id, true) {
        return r;
    }
    let body = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut sheets = shared.google.sheets.lock().unwrap();
    let book = sheets.get_mut(&id).expect("checked");
    // Atomic: a copy replaces the tabs only when every range succeeded.
    let mut tabs = book.tabs.clone();
    let result = if method == "values:batchClear" {
        batch_clear(&id, &mut tabs, &body)
    } else {
        batch_update_values(&id, &mut tabs, &body)
    };
    match result {
        Ok(out) => {
            book.tabs = tabs;
            Json(out).into_response()
        }
        Err(r) => r,
    }
}

#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn batch_clear(id: &str, tabs: &mut [Tab], body: &Value) -> Result<Value, Response> {
    let ranges = match body.get("ranges") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| r.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                bad("Invalid JSON payload received. 'ranges' must be a list of strings.")
            })?,
        Some(_) => {
            return Err(bad(
                "Invalid JSON payload received. 'ranges' must be a list of strings.",
            ))
        }
    };
    let mut cleared = Vec::new();
    for range in &ranges {
        cleared.push(Value::String(clear(tabs, range)?));
    }
    let mut out = json!({"spreadsheetId": id});
    if !cleared.is_empty() {
        out["clearedRanges"] = Value::Array(cleared);
    }
    Ok(out)
}

#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn batch_update_values(id: &str, tabs: &mut [Tab], body: &Value) -> Result<Value, Response> {
    let user_entered = input_option(body.get("valueInputOption").and_then(Value::as_str))?;
    let include: Option<Render> = include_option(
        body.get("includeValuesInResponse"),
        body.get("responseValueRenderOption")
            .and_then(Value::as_str),
        body.get("responseDateTimeRenderOption")
            .and_then(Value::as_str),
    )?;
    let data = match body.get("data") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad("Invalid JSON payload received. 'data' must be a list.")),
    };
    let mut responses = Vec::new();
    let (mut rows, mut cols, mut cells) = (0u64, 0u64, 0u64);
    let mut touched = std::collections::BTreeSet::new();
    for (i, item) in data.iter().enumerate() {
        let Some(range) = item.get("range").and_then(Value::as_str) else {
            return Err(bad(&format!("Invalid data[{i}]: a range is required")));
        };
        let values = values_of(item, user_entered)?;
        let Some(r) = parse_range(tabs, range) else {
            return Err(bad_range(range));
        };
        let out = update_values(id, tabs, r, range, &values, include)?;
        let n = |k: &str| out.get(k).and_then(Value::as_u64).unwrap_or(0);
        rows += n("updatedRows");
        cols += n("updatedColumns");
        if n("updatedCells") > 0 {
            touched.insert(r.tab);
        }
        cells += n("updatedCells");
        responses.push(out);
    }
    let mut out = json!({"spreadsheetId": id});
    for (k, v) in [
        ("totalUpdatedRows", rows),
        ("totalUpdatedColumns", cols),
        ("totalUpdatedCells", cells),
        ("totalUpdatedSheets", touched.len() as u64),
    ] {
        if v > 0 {
            out[k] = json!(v);
        }
    }
    if !responses.is_empty() {
        out["responses"] = Value::Array(responses);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_masks() {
        let m = parse_mask("sheets.properties(title,sheetId),spreadsheetId").unwrap();
        let v = json!({"spreadsheetId": "x", "properties": {"title": "t"},
            "sheets": [{"properties": {"title": "OTP", "sheetId": 0, "index": 0}, "data": []}]});
        assert_eq!(
            apply_mask(&v, &m),
            json!({"spreadsheetId": "x", "sheets": [{"properties": {"title": "OTP", "sheetId": 0}}]})
        );
        assert_eq!(
            parse_mask("sheets/properties/title"),
            parse_mask("sheets(properties(title))")
        );
        assert!(parse_mask("sheets(").is_none());
        assert!(parse_mask("a,,b").is_none());
        assert!(parse_mask(&"a(".repeat(100)).is_none());
        assert!(parse_mask("a)").is_none());
    }
}
