"""Drive the sandbox's Carol fake with TOTVS's own Python client (pycarol).

pycarol builds every request the way it does for {tenant}.carol.ai: the OAuth2 password
grant on /api/v5/oauth2/token (form), `Authorization: <token>` without a scheme, the
connector API-key headers, /api/v1/tenants/current and /api/v1/organizations/current,
staging schemas (GET, then POST), gzip sends to /api/v2/staging/intake/{table} with a
batchId and the batch summary, and the table drop. Nobody in this project wrote it, so when
it works against the fake, the fake speaks Carol's protocol rather than agreeing with pipe.

pycarol only speaks https: tests/fidelity.rs puts a TLS front with a self-signed
certificate before the fake and points REQUESTS_CA_BUNDLE at it. The host comes from
pycarol's own `host=` / `port=` arguments (instead of {tenant}.carol.ai).

Environment: CAROL_HOST CAROL_PORT CAROL_TENANT CAROL_ORGANIZATION CAROL_CONNECTOR_ID
CAROL_USER CAROL_PASSWORD CAROL_API_KEY (and REQUESTS_CA_BUNDLE).
Prints a JSON summary on stdout; exits 1 after listing every mismatch on stderr.
"""

import contextlib
import importlib.metadata
import json
import os
import sys
import traceback


def env(name):
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"carol_fidelity.py: the environment variable {name} is not set")
    return value


HOST = env("CAROL_HOST")
PORT = int(env("CAROL_PORT"))
TENANT = env("CAROL_TENANT")
ORG = env("CAROL_ORGANIZATION")
CONNECTOR = env("CAROL_CONNECTOR_ID")
USER = env("CAROL_USER")
PASSWORD = env("CAROL_PASSWORD")
API_KEY = env("CAROL_API_KEY")

from pycarol import ApiKeyAuth, Carol, PwdAuth, Staging  # noqa: E402

passed = []
failures = []


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def check(name):
    def wrap(fn):
        try:
            # pycarol prints progress on stdout; the summary alone goes there.
            with contextlib.redirect_stdout(sys.stderr):
                fn()
            passed.append(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append(f"{name}: {e!r}\n{traceback.format_exc()}")
        return fn

    return wrap


def login_password():
    return Carol(
        domain=TENANT,
        app_name=" ",
        organization=ORG,
        auth=PwdAuth(USER, PASSWORD),
        connector_id=CONNECTOR,
        host=HOST,
        port=PORT,
    )


def login_api_key():
    return Carol(
        domain=TENANT,
        app_name=" ",
        auth=ApiKeyAuth(API_KEY),
        connector_id=CONNECTOR,
        host=HOST,
        port=PORT,
    )


state = {}
RECORDS = [
    {"id": 1, "name": "Ana", "price": 10.5, "active": True},
    {"id": 2, "name": "Bruno", "price": 7.25, "active": False},
    {"id": 3, "name": "Carla", "price": 3.0, "active": True},
    {"id": 4, "name": "Davi", "price": 0.5, "active": False},
    {"id": 5, "name": "Eva", "price": 1.0, "active": True},
]


@check("password_login_and_current_tenant")
def _():
    carol = login_password()
    state["carol"] = carol
    current = carol.get_current()
    expect(current["env_name"] == TENANT, f"env_name {current}")
    expect(current["org_name"] == ORG, f"org_name {current}")
    expect(carol.auth._token.access_token, "no access token")


@check("wrong_password_is_rejected")
def _():
    try:
        Carol(
            domain=TENANT,
            app_name=" ",
            auth=PwdAuth(USER, "not-the-password"),
            connector_id=CONNECTOR,
            host=HOST,
            port=PORT,
        )
    except Exception as e:  # pycarol raises InvalidToken with Carol's error body
        expect("Invalid username or password" in str(e), f"unexpected error {e!r}")
        return
    raise Mismatch("a wrong password logged in")


@check("create_schema_from_records")
def _():
    staging = Staging(state["carol"])
    staging.create_schema(
        data=RECORDS,
        staging_name="fidelity",
        connector_id=CONNECTOR,
        crosswalk_list=["id"],
    )
    schema = staging.get_schema("fidelity", connector_id=CONNECTOR)
    expect(schema is not None, "schema not found after create_schema")
    props = schema["mdmStagingMapping"]["properties"]
    expect(props["id"]["type"] == "integer", f"id type {props}")
    expect(props["price"]["type"] == "double", f"price type {props}")
    expect(props["active"]["type"] == "boolean", f"active type {props}")
    expect(
        list(schema["mdmCrosswalkTemplate"]["mdmCrossreference"].values())[0] == ["id"],
        f"crosswalk {schema['mdmCrosswalkTemplate']}",
    )


@check("send_gzip_records_in_a_batch")
def _():
    staging = Staging(state["carol"])
    staging.send_data(
        "fidelity",
        data=RECORDS,
        connector_id=CONNECTOR,
        step_size=2,
        gzip=True,
        print_stats=False,
    )


@check("send_upserts_by_crosswalk")
def _():
    staging = Staging(state["carol"])
    staging.send_data(
        "fidelity",
        data=[{"id": 2, "name": "Bruno Souza", "price": 8.0, "active": True}],
        connector_id=CONNECTOR,
        gzip=True,
        print_stats=False,
    )


@check("send_a_dataframe_uncompressed")
def _():
    import pandas as pd

    df = pd.DataFrame([{"id": 6, "name": "Fábio", "price": 2.5, "active": False}])
    Staging(state["carol"]).send_data(
        "fidelity", data=df, connector_id=CONNECTOR, gzip=False, print_stats=False
    )


@check("api_key_login_sends")
def _():
    carol = login_api_key()
    current = carol.get_current()
    expect(current["env_name"] == TENANT, f"env_name {current}")
    Staging(carol).send_data(
        "fidelity",
        data=[{"id": 7, "name": "Gil", "price": 9.0, "active": True}],
        connector_id=CONNECTOR,
        print_stats=False,
    )


@check("current_user_and_connector_lookups")
def _():
    from pycarol import Connectors

    carol = state["carol"]
    user = carol.current_user
    expect(user.get("mdmUserLogin") == USER, f"current_user {user}")
    expect(user.get("mdmId"), f"current_user without mdmId {user}")
    details = carol.api_key_details(API_KEY, CONNECTOR)
    expect(details.get("mdmConnectorId") == CONNECTOR, f"api_key_details {details}")
    expect(API_KEY not in json.dumps(details), "api_key_details echoed the key")
    connectors = Connectors(carol)
    by_id = connectors.get_by_id(CONNECTOR)
    expect(by_id.get("mdmId") == CONNECTOR and by_id.get("mdmName"), f"get_by_id {by_id}")
    by_name = connectors.get_by_name(by_id["mdmName"])
    expect(by_name.get("mdmId") == CONNECTOR, f"get_by_name {by_name}")
    stagings = connectors.get_all_stagings(connector_name=by_id["mdmName"])
    expect("fidelity" in stagings, f"get_all_stagings {stagings}")
    try:
        connectors.get_by_name("no_such_connector")
    except Exception as e:  # pycarol raises with Carol's error body
        expect("Connector not found" in str(e), f"unexpected error {e!r}")
    else:
        raise Mismatch("a missing connector was found")


@check("send_to_a_table_without_schema_fails")
def _():
    try:
        Staging(state["carol"]).send_data(
            "noschema", data=RECORDS[:1], connector_id=CONNECTOR, print_stats=False
        )
    except Exception as e:
        expect("has no schema" in str(e), f"unexpected error {e!r}")
        return
    raise Mismatch("a send to a table without schema succeeded")


@check("expired_token_is_refreshed")
def _():
    carol = state["carol"]
    # pycarol refreshes 60 s before expiry: pretend the token is about to expire.
    old = carol.auth._token.access_token
    carol.auth._token.expiration = 1
    carol.get_current()
    expect(carol.auth._token.access_token != old, "the token was not refreshed")


@check("drop_staging")
def _():
    staging = Staging(state["carol"])
    staging.create_schema(
        data=RECORDS[:1], staging_name="scratch", connector_id=CONNECTOR, crosswalk_list=["id"]
    )
    staging.drop_staging("scratch", connector_id=CONNECTOR)
    expect(staging.get_schema("scratch", connector_id=CONNECTOR) is None, "still there")


summary = {
    "pycarol": importlib.metadata.version("pycarol"),
    "passed": passed,
    "failed": [f.splitlines()[0] for f in failures],
}
print(json.dumps(summary))
if failures:
    print("\n\n".join(failures), file=sys.stderr)
    sys.exit(1)
