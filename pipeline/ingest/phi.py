"""Metadata without PHI: the scanner identity from DICOM tags, and keyed patient keys.

``patient_key`` = HMAC-SHA256(secret, patient identifier). The secret is the user's (``ANATDIFF_PHI_SECRET``,
or a file named by ``ANATDIFF_PHI_SECRET_FILE``); without it a medical record number could be brute-forced
from its key in seconds. When is a secret required (docs/dataset-formats.md, "Patients, PHI"):

- a DICOM series carries a PatientID and does not declare PatientIdentityRemoved (0012,0062) = YES, or
- the input holds a ``patients.csv`` (its ``patient`` column names patients by definition).

Then the job refuses to run without a secret (one line saying how to set it). De-identified DICOM
(PatientIdentityRemoved YES: its PatientID is a pseudonym, e.g. the phantoms') and images without patient
tags (NIfTI, NRRD, MHA: the committed real CT) need none; de-identified IDs are then keyed with the public
``PUBLIC_KEY``, which only groups scans of one pseudonym.

Of the patient's tags only PatientID and PatientIdentityRemoved are ever read (``pipeline.io.dicom.HEADER_TAGS``),
and PatientID is turned into its key in the worker that read it. Patient name, birth date, institution,
accession number and physicians are never read.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
from collections.abc import Mapping
from pathlib import Path

from pipeline.config import UserError

SECRET_ENV = "ANATDIFF_PHI_SECRET"
SECRET_FILE_ENV = "ANATDIFF_PHI_SECRET_FILE"
#: the variable of earlier versions (a salt); read as the secret when SECRET_ENV is not set
LEGACY_SALT_ENV = "ANATDIFF_PHI_SALT"
#: key of de-identified PatientIDs when no secret is set: public, so it protects nothing
PUBLIC_KEY = "anatdiff-public-key-v2"
MIN_SECRET_CHARS = 16
SECRET_HINT = (f"set {SECRET_ENV} to a private random string of at least {MIN_SECRET_CHARS} characters (e.g. "
               f"`export {SECRET_ENV}=$(openssl rand -hex 32)`), or {SECRET_FILE_ENV} to a file holding one, "
               "and keep it: the same secret gives the same patient keys")


def resolve_secret(environ: Mapping[str, str] = os.environ) -> str | None:
    """The user's secret: the file named by ``ANATDIFF_PHI_SECRET_FILE``, else ``ANATDIFF_PHI_SECRET``
    (else the older ``ANATDIFF_PHI_SALT``); None when none is set. Raises UserError for an unreadable file or
    a secret shorter than ``MIN_SECRET_CHARS``."""
    where, secret = None, None
    if environ.get(SECRET_FILE_ENV):
        where = SECRET_FILE_ENV
        try:
            secret = Path(environ[SECRET_FILE_ENV]).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{SECRET_FILE_ENV}: cannot read the secret file ({getattr(e, 'strerror', None) or e})"
                            ) from None
    else:
        where = next((k for k in (SECRET_ENV, LEGACY_SALT_ENV) if environ.get(k)), None)
        secret = environ.get(where) if where else None
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        raise UserError(f"{where}: the secret has {len(secret)} characters, too few to protect patient IDs; "
                        + SECRET_HINT)
    return secret


def secret_required(what: str) -> UserError:
    """The one-line error for patient identifiers found (``what``) without a secret."""
    return UserError(f"{what} and no secret is set: patient keys would be guessable; {SECRET_HINT}")


def patient_key(patient_id: str | None, secret: str | None) -> str | None:
    """HMAC-SHA256 hex of ``patient_id`` under ``secret`` (None: ``PUBLIC_KEY``); None if there is no ID. The
    raw ID never reaches the manifest."""
    if not patient_id:
        return None
    return hmac.new((secret or PUBLIC_KEY).encode(), patient_id.encode(), hashlib.sha256).hexdigest()


def secret_tag(secret: str | None) -> str:
    """A fingerprint of the secret for resume keys (items keyed under another secret are processed again);
    keyed, so it reveals nothing of the secret."""
    return hmac.new((secret or PUBLIC_KEY).encode(), b"anatdiff-resume", hashlib.sha256).hexdigest()[:16]


def scanner_key(tags: Mapping[str, str | None]) -> str:
    """``manufacturer|model|kernel`` from DICOM tags (``unknown`` when all three are missing); ``|`` inside a
    value becomes ``/``."""
    parts = [(tags.get(k) or "").replace("|", "/") for k in
             ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel")]
    return "|".join(parts) if any(parts) else "unknown"


def parse_patients_csv(text: str, where: str = "patients.csv") -> dict[str, str]:
    """``source -> patient`` from CSV text with a header ``source,patient``. Raises UserError naming the line
    for a missing column, an empty value or a source listed twice with different patients."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"source", "patient"} <= {f.strip() for f in reader.fieldnames}:
        raise UserError(f"{where}: needs a header line 'source,patient', got {reader.fieldnames}")
    out: dict[str, str] = {}
    for n, rec in enumerate(reader, start=2):
        rec = {k.strip(): (v or "").strip() for k, v in rec.items() if k}
        source, patient = rec["source"].strip("/"), rec["patient"]
        if not source or not patient:
            raise UserError(f"{where} line {n}: 'source' and 'patient' must both be non-empty")
        if out.get(source, patient) != patient:
            raise UserError(f"{where} line {n}: a source is listed twice with different patients")
        out[source] = patient
    return out


def patient_keys(patients: dict[str, str], secret: str | None) -> dict[str, str]:
    """``source -> patient_key`` of a ``parse_patients_csv`` table. Raises UserError (``secret_required``)
    when the table names patients and ``secret`` is None."""
    if patients and secret is None:
        raise secret_required(f"patients.csv names {len(set(patients.values()))} patients")
    return {source: patient_key(patient, secret) for source, patient in patients.items()}


def key_for_source(source: str, keys: dict[str, str]) -> str | None:
    """The patient key of ``source`` (``folder#series`` falls back to its folder), or None."""
    return keys.get(source) or keys.get(source.split("#", 1)[0])
