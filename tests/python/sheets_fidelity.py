"""Drive the sandbox's Google fakes with Google's own Python clients.

`google-auth` signs the service-account JWT and posts it to the key file's `token_uri`;
`google-api-python-client` builds the Sheets v4 client from the discovery document bundled
in the package (no network) and sends every request the way it does to
sheets.googleapis.com. Nobody in this project wrote either, so when they work against the
fakes, the fakes speak the real protocol and do not merely agree with pipe's own client.

Run by tests/fidelity.rs against `pipe sandbox serve`. Environment:
  GOOGLE_APPLICATION_CREDENTIALS  the sandbox's service-account key file
  GOOGLE_URL                      the Google fake's base URL (http://127.0.0.1:PORT)
  OTP_SHEET_ID                    the OTP spreadsheet
  TIFLUX_URL, TIFLUX_USER, TIFLUX_PASSWORD   the web login that "e-mails" the OTP

Prints a JSON summary on stdout; exits 1 after listing every mismatch on stderr.
"""

import datetime
import importlib.metadata
import json
import os
import re
import sys
import time
import traceback

import google.auth.exceptions
import google.auth.transport.requests
import googleapiclient.discovery
import googleapiclient.errors
import requests
from google.oauth2 import service_account

SCOPE_RW = "https://www.googleapis.com/auth/spreadsheets"
SCOPE_RO = "https://www.googleapis.com/auth/spreadsheets.readonly"


def env(name):
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"sheets_fidelity.py: the environment variable {name} is not set")
    return value


KEY_FILE = env("GOOGLE_APPLICATION_CREDENTIALS")
GOOGLE_URL = env("GOOGLE_URL").rstrip("/")
SHEET = env("OTP_SHEET_ID")
TIFLUX_URL = env("TIFLUX_URL").rstrip("/")
TIFLUX_USER = env("TIFLUX_USER")
TIFLUX_PASSWORD = env("TIFLUX_PASSWORD")

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
    """Run one check; record it as passed or as a failure with its message."""
    name = fn.__name__
    try:
        fn()
        passed.append(name)
    except Mismatch as e:
        failures.append(f"{name}: {e}")
    except Exception as e:  # an exception the official client raised is a finding too
        failures.append(f"{name}: unexpected {type(e).__name__}: {e}\n{traceback.format_exc(limit=-2)}")
    return fn


def credentials(scopes):
    # Exactly what production code does with a key file: google-auth reads token_uri from it.
    return service_account.Credentials.from_service_account_file(KEY_FILE, scopes=scopes)


def sheets(creds):
    return googleapiclient.discovery.build(
        "sheets",
        "v4",
        credentials=creds,
        client_options={"api_endpoint": GOOGLE_URL + "/"},
        static_discovery=True,
        cache_discovery=False,
    )


def http_error(call, status, what):
    """Execute `call`; it must raise HttpError with `status`. Returns the error."""
    try:
        got = call.execute()
    except googleapiclient.errors.HttpError as e:
        expect_eq(e.status_code, status, f"{what}: HTTP status")
        body = json.loads(e.content.decode("utf-8"))
        err = body.get("error")
        expect(isinstance(err, dict), f"{what}: no `error` object in {body}")
        expect_eq(err.get("code"), status, f"{what}: error.code")
        expect(isinstance(err.get("message"), str) and err["message"], f"{what}: empty error.message")
        expect_eq(e.reason, err["message"], f"{what}: the client's reason (error.message)")
        expect(e.error_details, f"{what}: the client found no error details in {body}")
        return e
    raise Mismatch(f"{what}: expected HTTP {status}, got a success: {got}")


RW = credentials([SCOPE_RW])
API = sheets(RW)
values = API.spreadsheets().values()


@check
def token_from_key_file():
    expect(RW.token is None, "credentials have a token before any request")
    RW.refresh(google.auth.transport.requests.Request())
    expect(RW.token and RW.token.startswith("ya29."), f"access token {RW.token!r}")
    expect(RW.valid, "credentials not valid after refresh")
    left = (RW.expiry - datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)).total_seconds()
    expect(3000 < left <= 3600, f"token lifetime {left:.0f}s (expires_in 3599 expected)")


@check
def update_raw_then_get():
    rows = [["fidelity", 42, True, "0123"], ["", "x"]]
    out = values.update(
        spreadsheetId=SHEET,
        range="OTP!A5:D6",
        valueInputOption="RAW",
        body={"range": "OTP!A5:D6", "majorDimension": "ROWS", "values": rows},
    ).execute()
    expect_eq(out.get("spreadsheetId"), SHEET, "update: spreadsheetId")
    expect_eq(out.get("updatedRange"), "OTP!A5:D6", "update: updatedRange")
    expect_eq(out.get("updatedRows"), 2, "update: updatedRows")
    expect_eq(out.get("updatedColumns"), 4, "update: updatedColumns")
    expect_eq(out.get("updatedCells"), 6, "update: updatedCells")

    got = values.get(spreadsheetId=SHEET, range="OTP!A5:D6").execute()
    expect_eq(got.get("range"), "OTP!A5:D6", "get: range")
    expect_eq(got.get("majorDimension"), "ROWS", "get: majorDimension")
    # FORMATTED_VALUE (the default): everything as displayed text; trailing empties dropped.
    expect_eq(got.get("values"), [["fidelity", "42", "TRUE", "0123"], ["", "x"]], "get: values")

    raw = values.get(
        spreadsheetId=SHEET, range="OTP!A5:D6", valueRenderOption="UNFORMATTED_VALUE"
    ).execute()
    expect_eq(raw.get("values"), [["fidelity", 42, True, "0123"], ["", "x"]], "get UNFORMATTED_VALUE")

    cols = values.get(spreadsheetId=SHEET, range="OTP!A5:B6", majorDimension="COLUMNS").execute()
    expect_eq(cols.get("majorDimension"), "COLUMNS", "get COLUMNS: majorDimension")
    expect_eq(cols.get("values"), [["fidelity"], ["42", "x"]], "get COLUMNS: values")


@check
def quoted_tab_and_whole_tab_ranges():
    got = values.get(spreadsheetId=SHEET, range="'OTP'!A5:B5").execute()
    expect_eq(got.get("range"), "OTP!A5:B5", "quoted tab: range")
    expect_eq(got.get("values"), [["fidelity", "42"]], "quoted tab: values")
    whole = values.get(spreadsheetId=SHEET, range="OTP").execute()
    expect_eq(whole.get("range"), "OTP!A1:Z1000", "whole tab: range")
    expect_eq(whole["values"][0][:2], ["code", "received_at"], "whole tab: header row")


@check
def user_entered_numbers_become_numbers():
    # A single cell is the top-left corner of the block written (gspread's update(values, "A1")).
    out = values.update(
        spreadsheetId=SHEET,
        range="OTP!J40",
        valueInputOption="USER_ENTERED",
        body={"values": [["12", "abc", "2.5"], ["-3"]]},
    ).execute()
    expect_eq(out.get("updatedRange"), "OTP!J40:L41", "single-cell anchor: updatedRange")
    expect_eq(out.get("updatedCells"), 4, "single-cell anchor: updatedCells")
    raw = values.get(spreadsheetId=SHEET, range="OTP!J40:L41", valueRenderOption="UNFORMATTED_VALUE").execute()
    expect_eq(raw.get("values"), [[12, "abc", 2.5], [-3]], "USER_ENTERED then UNFORMATTED_VALUE")
    expect(type(raw["values"][0][0]) is int, f"a whole number came back as {raw['values'][0][0]!r}")
    shown = values.get(spreadsheetId=SHEET, range="OTP!J40:L41").execute()
    expect_eq(shown.get("values"), [["12", "abc", "2.5"], ["-3"]], "USER_ENTERED then FORMATTED_VALUE")


@check
def empty_range_has_no_values():
    got = values.get(spreadsheetId=SHEET, range="OTP!F20:G30").execute()
    expect("values" not in got, f"an empty range came back with `values`: {got}")
    expect_eq(got.get("range"), "OTP!F20:G30", "empty range: range")
    expect_eq(got.get("majorDimension"), "ROWS", "empty range: majorDimension")


@check
def otp_mailed_by_the_web_login_is_readable():
    # The web login "e-mails" a one-time code into OTP!A2:B2 after a delay; wait for a row
    # other than the one already there (an earlier login's).
    before = values.get(spreadsheetId=SHEET, range="OTP!A2:B2").execute().get("values")
    r = requests.post(
        f"{TIFLUX_URL}/api/login", json={"email": TIFLUX_USER, "password": TIFLUX_PASSWORD}, timeout=10
    )
    expect_eq(r.status_code, 200, f"POST /api/login ({r.text})")
    tmp = r.json()["tmp"]
    deadline = time.monotonic() + 15
    row = None
    while time.monotonic() < deadline:
        got = values.get(spreadsheetId=SHEET, range="OTP!A2:B2").execute()
        if got.get("values") and got["values"] != before:
            row = got["values"][0]
            break
        time.sleep(0.1)
    expect(row is not None, "the OTP never appeared in OTP!A2:B2 within 15s")
    expect_eq(got.get("range"), "OTP!A2:B2", "OTP get: range")
    expect(len(row) == 2 and re.fullmatch(r"\d{6}", row[0]), f"OTP row {row}")
    sent = datetime.datetime.fromisoformat(row[1].replace("Z", "+00:00"))
    expect(sent.tzinfo is not None, f"sent_at {row[1]!r} has no offset")
    # The code the official client read is the one the login accepts.
    r = requests.post(f"{TIFLUX_URL}/api/login/otp", json={"tmp": tmp, "otp": row[0]}, timeout=10)
    expect_eq(r.status_code, 200, f"POST /api/login/otp ({r.text})")
    auth = r.headers.get("authorization", "")
    expect(auth.startswith("Bearer "), f"authorization header {auth!r}")
    r = requests.post(f"{TIFLUX_URL}/api/logout", headers={"Authorization": auth}, timeout=10)
    expect_eq(r.status_code, 204, "POST /api/logout")


@check
def unknown_spreadsheet_is_404():
    e = http_error(values.get(spreadsheetId="1NoSuchSpreadsheet0000000000000000000000000", range="A1"), 404, "unknown spreadsheet")
    expect_eq(json.loads(e.content)["error"].get("status"), "NOT_FOUND", "404: error.status")


@check
def bad_range_is_400():
    e = http_error(values.get(spreadsheetId=SHEET, range="NoSuchTab!A1:B2"), 400, "bad range")
    expect("Unable to parse range" in e.reason, f"400 message {e.reason!r}")
    expect_eq(json.loads(e.content)["error"].get("status"), "INVALID_ARGUMENT", "400: error.status")


@check
def forbidden_spreadsheet_is_403():
    e = http_error(values.get(spreadsheetId="forbidden", range="A1"), 403, "forbidden spreadsheet")
    expect_eq(json.loads(e.content)["error"].get("status"), "PERMISSION_DENIED", "403: error.status")


@check
def readonly_scope_cannot_write():
    ro = sheets(credentials([SCOPE_RO])).spreadsheets().values()
    got = ro.get(spreadsheetId=SHEET, range="OTP!A1:B1").execute()
    expect_eq(got.get("values"), [["code", "received_at"]], "read-only get of the header row")
    http_error(
        ro.update(spreadsheetId=SHEET, range="OTP!H1", valueInputOption="RAW", body={"values": [["no"]]}),
        403,
        "update with spreadsheets.readonly",
    )


@check
def missing_value_input_option_is_400():
    # The discovery document does not mark valueInputOption required, so the client sends
    # the request without it and the server must refuse it, as Google does.
    http_error(values.update(spreadsheetId=SHEET, range="OTP!H1", body={"values": [["no"]]}), 400, "update without valueInputOption")


@check
def rejected_token_is_refreshed_and_retried():
    # google-auth-httplib2 answers a 401 by fetching a new token and retrying once.
    creds = credentials([SCOPE_RW])
    api = sheets(creds).spreadsheets().values()
    api.get(spreadsheetId=SHEET, range="OTP!A1").execute()
    first = creds.token
    creds.token = "ya29.revoked-by-the-test"  # still "valid" for the client: expiry in the future
    got = api.get(spreadsheetId=SHEET, range="OTP!A1").execute()
    expect_eq(got.get("values"), [["code"]], "get after the 401 and refresh")
    expect(creds.token not in (first, "ya29.revoked-by-the-test"), "the client did not get a new token")


@check
def expired_token_is_refreshed_before_the_request():
    creds = credentials([SCOPE_RW])
    api = sheets(creds).spreadsheets().values()
    api.get(spreadsheetId=SHEET, range="OTP!A1").execute()
    first = creds.token
    creds.expiry = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(seconds=1)
    expect(not creds.valid, "credentials still valid after expiry moved to the past")
    api.get(spreadsheetId=SHEET, range="OTP!A1").execute()
    expect(creds.valid and creds.token != first, "the client did not refresh an expired token")


@check
def unknown_service_account_is_invalid_grant():
    with open(KEY_FILE) as f:
        info = json.load(f)
    info["client_email"] = "someone-else@" + info["client_email"].split("@", 1)[1]
    creds = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE_RW])
    try:
        creds.refresh(google.auth.transport.requests.Request())
    except google.auth.exceptions.RefreshError as e:
        expect("invalid_grant" in str(e), f"RefreshError without invalid_grant: {e}")
        expect(not getattr(e, "retryable", False), "invalid_grant marked retryable by the client")
        return
    raise Mismatch("a JWT from an unknown service account got a token")


summary = {
    "client": {
        name: importlib.metadata.version(name)
        for name in ("google-api-python-client", "google-auth", "google-auth-httplib2", "httplib2")
    },
    "passed": passed,
    "failed": failures,
}
print(json.dumps(summary, indent=2))
if failures:
    print(f"sheets_fidelity.py: {len(failures)} mismatch(es) with the official clients:", file=sys.stderr)
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    sys.exit(1)
