"""Drive the sandbox's Sheets fake with gspread, the Sheets client most Python users reach for.

gspread signs in with google-auth from the key file (its `token_uri` is the fake's) and
sends every request to https://sheets.googleapis.com; a requests transport adapter mounted
on gspread's own session sends them to the fake instead, changing the scheme, host and
port and nothing else. Nobody in this project wrote gspread, so when it works against the
fake, the fake answers what gspread reads: `open_by_key` (spreadsheets.get), `worksheet()`,
`get_all_values`, `acell`, `update`, `append_row(s)`, `clear`, `batch_get`, `batch_clear`,
`batch_update`, `add_worksheet`, `update_title`, `resize`, `del_worksheet`, and its errors.

Run by tests/fidelity.rs against `pipe sandbox serve`. Environment:
  GOOGLE_APPLICATION_CREDENTIALS  the sandbox's service-account key file
  GOOGLE_URL                      the Google fake's base URL (http://127.0.0.1:PORT)
  OTP_SHEET_ID                    the OTP spreadsheet

Prints a JSON summary on stdout; exits 1 after listing every mismatch on stderr.
"""

import importlib.metadata
import json
import os
import sys
import traceback

import gspread
import requests.adapters

GOOGLE_HOST = "https://sheets.googleapis.com"


def env(name):
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"gspread_fidelity.py: the environment variable {name} is not set")
    return value


KEY_FILE = env("GOOGLE_APPLICATION_CREDENTIALS")
GOOGLE_URL = env("GOOGLE_URL").rstrip("/")
SHEET = env("OTP_SHEET_ID")


class ToSandbox(requests.adapters.HTTPAdapter):
    """Send gspread's requests for sheets.googleapis.com to the fake: same path and query."""

    def send(self, request, **kwargs):
        if request.url.startswith(GOOGLE_HOST + "/"):
            request.url = GOOGLE_URL + request.url[len(GOOGLE_HOST):]
        return super().send(request, **kwargs)


passed = []
failures = []


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def expect_eq(actual, expected, what):
    if actual != expected:
        raise Mismatch(f"{what}: expected {expected!r}, got {actual!r}")


def check(fn):
    name = fn.__name__
    try:
        fn()
        passed.append(name)
    except Mismatch as e:
        failures.append(f"{name}: {e}")
    except Exception as e:  # an exception gspread raised is a finding too
        failures.append(f"{name}: unexpected {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    return fn


def api_error(fn, status, what):
    """`fn()` must raise gspread's APIError with `status` and Google's error body."""
    try:
        got = fn()
    except gspread.exceptions.APIError as e:
        expect_eq(e.response.status_code, status, f"{what}: HTTP status")
        expect_eq(e.code, status, f"{what}: error.code as gspread read it")
        expect(isinstance(e.error.get("message"), str) and e.error["message"], f"{what}: no error.message in {e.error}")
        expect(e.error.get("status"), f"{what}: no error.status in {e.error}")
        return e
    raise Mismatch(f"{what}: expected HTTP {status}, got a success: {got!r}")


GC = gspread.service_account(filename=KEY_FILE)
GC.http_client.session.mount(GOOGLE_HOST + "/", ToSandbox())
state = {}


@check
def open_by_key_reads_the_metadata():
    sh = GC.open_by_key(SHEET)
    state["sh"] = sh
    expect_eq(sh.id, SHEET, "spreadsheet id")
    expect(isinstance(sh.title, str) and sh.title, f"spreadsheet title {sh.title!r}")
    expect_eq(sh.locale, "en_US", "locale")
    titles = [ws.title for ws in sh.worksheets()]
    expect("OTP" in titles, f"worksheets {titles}")
    first = sh.sheet1
    expect_eq(first.id, 0, "the first tab's sheetId (gid)")
    expect_eq((first.row_count, first.col_count), (1000, 26), "the first tab's grid")


@check
def worksheet_by_title_and_its_values():
    ws = state["sh"].worksheet("OTP")
    expect_eq(ws.title, "OTP", "worksheet title")
    rows = ws.get_all_values()
    expect_eq(rows[0], ["code", "received_at"], "header row")
    expect_eq(ws.acell("A1").value, "code", "acell A1")
    expect_eq(ws.cell(1, 2).value, "received_at", "cell(1, 2)")
    try:
        state["sh"].worksheet("NoSuchTab")
    except gspread.exceptions.WorksheetNotFound:
        pass
    else:
        raise Mismatch("worksheet('NoSuchTab') was found")


@check
def add_worksheet_update_and_read_back():
    sh = state["sh"]
    ws = sh.add_worksheet("gspread-fidelity", rows=20, cols=5)
    state["ws"] = ws
    expect_eq((ws.row_count, ws.col_count), (20, 5), "new tab's grid")
    expect(ws.id != 0, f"new tab's sheetId {ws.id}")
    out = ws.update([["name", "n"], ["a", 1], ["b", 2]], "A1")
    expect_eq(out.get("updatedRange"), "'gspread-fidelity'!A1:B3", "update: updatedRange")
    expect_eq(out.get("updatedCells"), 6, "update: updatedCells")
    expect_eq(ws.get_all_values(), [["name", "n"], ["a", "1"], ["b", "2"]], "get_all_values")
    expect_eq(ws.get("B2:B3", value_render_option="UNFORMATTED_VALUE"), [[1], [2]], "get UNFORMATTED_VALUE")
    expect_eq(ws.get_all_records(), [{"name": "a", "n": 1}, {"name": "b", "n": 2}], "get_all_records")
    again = sh.worksheet("gspread-fidelity")
    expect_eq(again.id, ws.id, "the tab found again by title")
    api_error(lambda: sh.add_worksheet("gspread-fidelity", rows=5, cols=5), 400, "a second tab of the same name")


@check
def append_rows_after_the_table():
    ws = state["ws"]
    out = ws.append_row(["c", 3])
    expect_eq(out.get("tableRange"), "'gspread-fidelity'!A1:B3", "append: tableRange")
    expect_eq(out["updates"].get("updatedRange"), "'gspread-fidelity'!A4:B4", "append: updatedRange")
    ws.append_rows([["d", "4"], ["e", "5"]], value_input_option="USER_ENTERED")
    expect_eq(
        ws.get("A4:B6", value_render_option="UNFORMATTED_VALUE"),
        [["c", 3], ["d", 4], ["e", 5]],
        "appended rows (USER_ENTERED numbers become numbers)",
    )
    ws.update([["note"]], "A9")
    out = ws.append_row(["f", 6], table_range="A1:B1")
    expect_eq(out["updates"].get("updatedRange"), "'gspread-fidelity'!A7:B7", "append after the first table only")
    out = ws.append_row(["x", 0], insert_data_option="INSERT_ROWS", table_range="A1:B1")
    expect_eq(out["updates"].get("updatedRange"), "'gspread-fidelity'!A8:B8", "INSERT_ROWS: updatedRange")
    expect_eq(ws.acell("A10").value, "note", "INSERT_ROWS moved the rows below down")


@check
def batch_get_clear_and_update():
    ws = state["ws"]
    got = ws.batch_get(["A1:B2", "A4"])
    expect_eq([list(r) for r in got], [[["name", "n"], ["a", "1"]], [["c"]]], "batch_get values")
    expect_eq(got[0].range, "'gspread-fidelity'!A1:B2", "batch_get: first range")
    out = ws.batch_update(
        [{"range": "D1:E1", "values": [["x", "y"]]}, {"range": "D3", "values": [["z"]]}]
    )
    expect_eq(out.get("totalUpdatedCells"), 3, "batch_update: totalUpdatedCells")
    expect_eq(out.get("totalUpdatedSheets"), 1, "batch_update: totalUpdatedSheets")
    expect_eq(len(out.get("responses", [])), 2, "batch_update: responses")
    out = ws.batch_clear(["D1:E1", "D3"])
    expect_eq(out.get("clearedRanges"), ["'gspread-fidelity'!D1:E1", "'gspread-fidelity'!D3"], "batch_clear: clearedRanges")
    left = ws.get("D1:E3")
    expect(list(left) in ([], [[]]), f"cleared cells still hold {left}")


@check
def update_title_resize_clear_and_delete():
    sh, ws = state["sh"], state["ws"]
    ws.update_title("gspread renamed")
    expect_eq(sh.worksheet("gspread renamed").id, ws.id, "renamed tab")
    ws.resize(rows=30, cols=6)
    again = sh.worksheet("gspread renamed")
    expect_eq((again.row_count, again.col_count), (30, 6), "resized grid")
    out = ws.clear()
    expect_eq(out.get("clearedRange"), "'gspread renamed'!A1:F30", "clear: clearedRange")
    left = ws.get_all_values()
    expect(left in ([], [[]]), f"a cleared tab still has {left}")
    sh.del_worksheet(ws)
    expect("gspread renamed" not in [w.title for w in sh.worksheets()], "the tab is gone")
    only = sh.worksheets()
    api_error(lambda: sh.del_worksheet(only[0]) if len(only) == 1 else sh.batch_update(
        {"requests": [{"deleteSheet": {"sheetId": w.id}} for w in only]}), 400, "deleting every tab")


@check
def metadata_masks_and_grid_data():
    sh = state["sh"]
    meta = sh.fetch_sheet_metadata(params={"fields": "sheets.properties(title,sheetId)"})
    expect_eq(list(meta), ["sheets"], "fields mask: top-level keys")
    expect_eq(meta["sheets"][0]["properties"], {"sheetId": 0, "title": "OTP"}, "fields mask: sheet properties")
    grid = sh.fetch_sheet_metadata(params={"includeGridData": "true", "ranges": "OTP!A1:B1"})
    data = grid["sheets"][0]["data"][0]
    cells = data["rowData"][0]["values"]
    expect_eq(cells[0]["formattedValue"], "code", "grid data: formattedValue")
    expect_eq(cells[0]["userEnteredValue"], {"stringValue": "code"}, "grid data: userEnteredValue")
    expect("startRow" not in data, f"grid data of row 1 has startRow: {data}")


@check
def errors_are_googles():
    api_error(lambda: GC.http_client.request("get", f"{GOOGLE_HOST}/v4/spreadsheets/{SHEET}/values:batchGet",
                                             params={"ranges": "NoSuchTab!A1"}), 400, "batchGet of a missing tab")
    api_error(lambda: GC.http_client.request("delete", f"{GOOGLE_HOST}/v4/spreadsheets/{SHEET}/values/A1"), 404,
              "a method Sheets does not have")
    api_error(lambda: state["sh"].batch_update({"requests": [{"mergeCells": {"range": {"sheetId": 0}}}]}), 400,
              "a request the sandbox does not serve")
    try:
        GC.open_by_key("1NoSuchSpreadsheet0000000000000000000000000")
    except gspread.exceptions.SpreadsheetNotFound:
        pass
    else:
        raise Mismatch("open_by_key of a missing spreadsheet succeeded")


summary = {
    "client": {name: importlib.metadata.version(name) for name in ("gspread", "google-auth", "requests")},
    "passed": passed,
    "failed": failures,
}
print(json.dumps(summary, indent=2))
if failures:
    print(f"gspread_fidelity.py: {len(failures)} mismatch(es) with gspread:", file=sys.stderr)
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    sys.exit(1)
