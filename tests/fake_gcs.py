"""A fake Google Cloud Storage, so that tests use gs:// paths offline and without credentials.

One HTTP server on 127.0.0.1, in a thread of the test process, keeps objects in a dict and answers
the part of the GCS JSON API that the package's storage clients use:

  * TensorStore (the array data of Orbax checkpoints) is pointed at it by
    `TENSORSTORE_GCS_HTTP_URL`.
  * google-cloud-storage (Orbax asks it whether a bucket has a hierarchical namespace) by
    `STORAGE_EMULATOR_HOST`.
  * TensorFlow's GCS filesystem (`tf.io.gfile`, hence `etils.epath`, `storage/files.py` and the
    metric writers) has fixed endpoints, https://www.googleapis.com and
    https://storage.googleapis.com, but its libcurl honours `https_proxy` and `CURL_CA_BUNDLE`.
    The server is therefore also that proxy: it accepts CONNECT to *.googleapis.com, ends the TLS
    itself with a certificate of a throw-away authority that `CURL_CA_BUNDLE` names, and serves
    the same API inside the tunnel.
  * `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives TensorFlow and TensorStore a token, so neither looks for
    credentials.

The `fake_gcs` fixture sets these variables for one test (processes it starts inherit them) and
empties the store before and after it; its `objects` maps 'gs://bucket/name' to bytes. Any bucket
name works. The server starts once per test process, in about 0.1 s.

TensorFlow reads its GCS cache settings once, when it is imported. This module turns its stat and
listing caches off, so it must be imported first (conftest.py does): otherwise an object removed
by one test could still seem to exist in the next. Set FAKE_GCS_LOG=1 to print every request.
"""

import datetime
import http.server
import json
import os
import socketserver
import ssl
import sys
import tempfile
import threading
import urllib.parse
import warnings

import pytest

_TF_IMPORTED_FIRST = 'tensorflow' in sys.modules
os.environ.setdefault('GCS_STAT_CACHE_MAX_AGE', '0')
os.environ.setdefault('GCS_MATCHING_PATHS_CACHE_MAX_AGE', '0')

_PROXIED = ('www.googleapis.com', 'storage.googleapis.com')  # TensorFlow's endpoints.


class _Object:
  """An object's bytes, generation (its version: TensorStore's writes are conditional on it) and
  time of writing."""

  def __init__(self, data: bytes, generation: int):
    self.data = data
    self.generation = generation
    self.updated = datetime.datetime.now(datetime.timezone.utc)

  def metadata(self, bucket: str, name: str) -> dict:
    updated = self.updated.isoformat(timespec='milliseconds').replace('+00:00', 'Z')
    return {'bucket': bucket, 'name': name, 'generation': str(self.generation),
            'metageneration': '1', 'size': str(len(self.data)), 'updated': updated}


def _write_tls_files(directory: str) -> tuple[str, str]:
  """Writes a throw-away CA and a certificate of `_PROXIED` that it signs, with its key.

  Returns (the CA's PEM file, for `CURL_CA_BUNDLE`; the certificate chain and key, for the
  server).
  """
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)

  def certificate(subject, issuer, public_key, signing_key, *extensions):
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30)))
    for extension, critical in extensions:
      builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())

  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'fake GCS test CA')])
  ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key,
                   (x509.BasicConstraints(ca=True, path_length=None), True),
                   (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                  content_commitment=False, key_encipherment=False,
                                  data_encipherment=False, key_agreement=False,
                                  encipher_only=False, decipher_only=False), True),
                   (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False))
  leaf = certificate(
      x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _PROXIED[0])]), ca_name,
      key.public_key(), ca_key,
      (x509.SubjectAlternativeName([x509.DNSName(host) for host in _PROXIED]), False),
      (x509.BasicConstraints(ca=False, path_length=None), True),
      (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
      (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False))
  pem = serialization.Encoding.PEM
  ca_path, server_path = os.path.join(directory, 'ca.pem'), os.path.join(directory, 'server.pem')
  with open(ca_path, 'wb') as f:
    f.write(ca.public_bytes(pem))
  with open(server_path, 'wb') as f:
    f.write(leaf.public_bytes(pem) + ca.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
  return ca_path, server_path


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, tls: ssl.SSLContext):
    super().__init__(('127.0.0.1', 0), _Handler)
    self.tls = tls
    self.lock = threading.Lock()  # Guards the three fields below.
    self.objects: dict[tuple[str, str], _Object] = {}  # By (bucket, name).
    self.uploads: dict[str, tuple[str, str, dict]] = {}  # Open resumable uploads: their object.
    self.generation = 1_700_000_000_000_000  # The last one given.

  def put(self, bucket: str, name: str, data: bytes) -> _Object:
    """Stores `data` as a new generation of `bucket/name` (the caller holds the lock)."""
    self.generation += 1
    stored = self.objects[bucket, name] = _Object(data, self.generation)
    return stored


class _Handler(http.server.BaseHTTPRequestHandler):
  """One connection: plain HTTP, or a CONNECT tunnel whose TLS it ends (TensorFlow's requests)."""
  protocol_version = 'HTTP/1.1'  # Keep-alive: clients reuse their connections.
  disable_nagle_algorithm = True  # Else each small response waits 40 ms for a delayed ACK.
  server: _Server

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    if os.environ.get('FAKE_GCS_LOG'):
      super().log_message(format, *args)

  def do_CONNECT(self):
    host = self.path.rsplit(':', 1)[0]
    if host not in _PROXIED:
      self._error(403, f'the fake GCS proxy only tunnels to {_PROXIED}, not to {host}')
      self.close_connection = True
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.connection = self.server.tls.wrap_socket(self.connection, server_side=True)
    self.rfile = self.connection.makefile('rb', -1)
    self.wfile = socketserver._SocketWriter(self.connection)  # pylint: disable=protected-access

  def do_GET(self):
    self._dispatch()

  def do_POST(self):
    self._dispatch()

  def do_PUT(self):
    self._dispatch()

  def do_DELETE(self):
    self._dispatch()

  def _send(self, code: int, body: bytes | dict = b'', headers: tuple = ()):
    if isinstance(body, dict):
      body = json.dumps(body).encode()
      headers += (('Content-Type', 'application/json; charset=UTF-8'),)
    self.send_response(code)
    for name, value in headers:
      self.send_header(name, value)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _error(self, code: int, message: str):
    self._send(code, {'error': {'code': code, 'message': message,
                                'errors': [{'message': message, 'reason': str(code)}]}})

  def _body(self) -> bytes:
    """The request's body: TensorFlow sends its uploads in chunks, the other clients whole."""
    if self.headers.get('Transfer-Encoding', '').lower() != 'chunked':
      return self.rfile.read(int(self.headers.get('Content-Length') or 0))
    body = bytearray()
    while size := int(self.rfile.readline().split(b';')[0], 16):  # Each chunk: its size in hex,
      body += self.rfile.read(size)  # its bytes,
      self.rfile.readline()  # and a line end.
    while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # Trailer lines, up to an empty one.
      pass
    return bytes(body)

  def _dispatch(self):
    """Routes a request; names in paths are percent-encoded, so '/' splits them safely."""
    body = self._body()
    path, _, query = self.path.partition('?')
    query = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    parts = [urllib.parse.unquote(p) for p in path.split('/')[1:]]
    command = self.command
    match parts:
      case ['storage', 'v1', 'b', bucket] if command == 'GET':
        self._send(200, {'name': bucket})
      case ['storage', 'v1', 'b', bucket, 'storageLayout'] if command == 'GET':
        self._send(200, {'bucket': bucket})  # A flat namespace (TensorFlow asks, to rename folders).
      case ['storage', 'v1', 'b', bucket, 'o'] if command == 'GET':
        self._list(bucket, query)
      case ['storage', 'v1', 'b', bucket, 'o', name] if command == 'GET':
        self._get(bucket, name, query, media=query.get('alt') == 'media')
      case ['storage', 'v1', 'b', bucket, 'o', name] if command == 'DELETE':
        self._delete(bucket, name, query)
      case ['storage', 'v1', 'b', bucket, 'o', name, 'rewriteTo', 'b', to_bucket, 'o', to_name]:
        self._rewrite(bucket, name, to_bucket, to_name)
      case ['upload', 'storage', 'v1', 'b', bucket, 'o'] if query.get('uploadType') == 'media':
        self._insert(bucket, query['name'], body, query)
      case ['upload', 'storage', 'v1', 'b', bucket, 'o'] if query.get('uploadType') == 'resumable':
        self._resumable(bucket, query, body)
      case [bucket, *name] if command == 'GET' and name and bucket not in ('storage', 'upload'):
        # The XML API: TensorFlow's reads.
        self._get(bucket, '/'.join(name), query, media=True)
      case _:
        self._error(400, f'the fake GCS does not support {command} {self.path}')

  def _failed_precondition(self, stored: _Object | None, query: dict) -> int | None:
    """The status of a request conditional on the object's generation (0: absent), if it fails."""
    generation = stored.generation if stored else 0
    if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != generation:
      return 412
    if 'ifGenerationNotMatch' in query and int(query['ifGenerationNotMatch']) == generation:
      return 304
    return None

  def _get(self, bucket: str, name: str, query: dict, media: bool):
    with self.server.lock:
      stored = self.server.objects.get((bucket, name))
    if stored is None:
      return self._error(404, f'no object {name} in bucket {bucket}')
    failed = self._failed_precondition(stored, query)
    if failed == 304:  # TensorStore's read of an object it holds: not modified.
      return self._send(304)
    if failed:
      return self._error(failed, 'precondition failed')
    if not media:
      return self._send(200, stored.metadata(bucket, name))
    headers = (('x-goog-generation', str(stored.generation)),)  # TensorStore reads it.
    data, size = stored.data, len(stored.data)
    if 'Range' not in self.headers:
      return self._send(200, data, headers)
    first, last = map(int, self.headers['Range'].removeprefix('bytes=').split('-'))  # Inclusive.
    if first >= size:
      return self._send(416, b'', headers + (('Content-Range', f'bytes */{size}'),))
    last = min(last, size - 1)
    self._send(206, data[first:last + 1],
               headers + (('Content-Range', f'bytes {first}-{last}/{size}'),))

  def _insert(self, bucket: str, name: str, data: bytes, query: dict):
    with self.server.lock:
      if self._failed_precondition(self.server.objects.get((bucket, name)), query):
        return self._error(412, 'precondition failed')
      stored = self.server.put(bucket, name, data)
    self._send(200, stored.metadata(bucket, name))

  def _resumable(self, bucket: str, query: dict, body: bytes):
    """A resumable upload: a POST opens it, one PUT brings the whole object (TensorFlow's uploads;
    it would ask how much arrived only to resume a failed one)."""
    uploads = self.server.uploads
    if 'upload_id' in query:
      with self.server.lock:
        upload = uploads.pop(query['upload_id'], None)
      if upload is None:
        return self._error(404, 'no such upload')
      bucket, name, opening_query = upload
      return self._insert(bucket, name, body, opening_query)
    with self.server.lock:
      self.server.generation += 1
      upload_id = str(self.server.generation)
      uploads[upload_id] = (bucket, query['name'], query)
    scheme = 'https' if isinstance(self.connection, ssl.SSLSocket) else 'http'
    self._send(200, b'', (('Location', f'{scheme}://{self.headers["Host"]}/upload/storage/v1/b/'
                                       f'{urllib.parse.quote(bucket)}/o?uploadType=resumable'
                                       f'&upload_id={upload_id}'),))

  def _delete(self, bucket: str, name: str, query: dict):
    with self.server.lock:
      stored = self.server.objects.get((bucket, name))
      if stored is None:
        return self._error(404, f'no object {name} in bucket {bucket}')
      if self._failed_precondition(stored, query):
        return self._error(412, 'precondition failed')
      del self.server.objects[bucket, name]
    self._send(204)

  def _rewrite(self, bucket: str, name: str, to_bucket: str, to_name: str):
    """A copy in one call (TensorFlow renames by a copy and a delete)."""
    with self.server.lock:
      stored = self.server.objects.get((bucket, name))
      if stored is None:
        return self._error(404, f'no object {name} in bucket {bucket}')
      metadata = self.server.put(to_bucket, to_name, stored.data).metadata(to_bucket, to_name)
    self._send(200, {'done': True, 'resource': metadata})

  def _list(self, bucket: str, query: dict):
    """The objects under `prefix`, those past a `delimiter` folded into prefixes, in pages."""
    prefix, delimiter = query.get('prefix', ''), query.get('delimiter', '')
    with self.server.lock:
      found = {n: o.metadata(bucket, n) for (b, n), o in self.server.objects.items()
               if b == bucket and n.startswith(prefix)}
    entries = {}  # By name, whether an object's or a folded prefix.
    for name, metadata in found.items():
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        folded = prefix + rest[:rest.index(delimiter) + len(delimiter)]
        entries[folded] = None
      else:
        entries[name] = metadata
    start, size = int(query.get('pageToken') or 0), int(query.get('maxResults') or 1000)
    page = sorted(entries)[start:start + size]
    result = {'items': [entries[n] for n in page if entries[n]],
              'prefixes': [n for n in page if entries[n] is None],
              'nextPageToken': str(start + size) if start + size < len(entries) else None}
    self._send(200, {key: value for key, value in result.items() if value})  # As GCS: no empties.


class FakeGcs:
  """The running server; `env` holds the variables that point the clients at it."""

  def __init__(self):
    self._files = tempfile.TemporaryDirectory(prefix='fake_gcs_')
    ca_path, server_path = _write_tls_files(self._files.name)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server_path)
    self._server = _Server(tls)
    threading.Thread(target=self._server.serve_forever, name='fake-gcs', daemon=True).start()
    url = f'http://127.0.0.1:{self._server.server_address[1]}'
    local = ','.join(filter(None, [os.environ.get('no_proxy'), '127.0.0.1', 'localhost']))
    self.env = {
        'https_proxy': url, 'CURL_CA_BUNDLE': ca_path,  # TensorFlow.
        'no_proxy': local, 'NO_PROXY': local,  # The other clients reach the server directly.
        'TENSORSTORE_GCS_HTTP_URL': url,
        'STORAGE_EMULATOR_HOST': url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',  # TensorFlow and TensorStore.
    }

  @property
  def objects(self) -> dict[str, bytes]:
    """Every stored object: 'gs://bucket/name' to its bytes."""
    with self._server.lock:
      return {f'gs://{b}/{n}': o.data for (b, n), o in self._server.objects.items()}

  def reset(self) -> None:
    with self._server.lock:
      self._server.objects.clear()
      self._server.uploads.clear()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._files.cleanup()


@pytest.fixture(scope='session')
def fake_gcs_server():
  """The server, started once per test process; tests use `fake_gcs`."""
  server = FakeGcs()
  yield server
  server.close()


@pytest.fixture
def fake_gcs(fake_gcs_server, monkeypatch):
  """An empty fake store that every gs:// path of the test (and of the processes it starts) uses."""
  if _TF_IMPORTED_FIRST:
    warnings.warn('TensorFlow was imported before fake_gcs.py: its GCS stat cache may show objects '
                  'of earlier tests; import fake_gcs.py first (conftest.py does)')
  for name, value in fake_gcs_server.env.items():
    monkeypatch.setenv(name, value)
  fake_gcs_server.reset()
  yield fake_gcs_server
  fake_gcs_server.reset()
