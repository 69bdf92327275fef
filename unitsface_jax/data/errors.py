"""The one exception the data layer raises for bad input: ``DataError``.

A bad record must fail loudly and say where it is, so a user can find it in a 100 GB file:
every ``DataError`` names the file, the record index and the byte offset when they are known.
"""

from __future__ import annotations

from unitsface_jax import errors


class DataError(errors.UserError, ValueError):
  """Bad input data: a broken RecordIO record, an undecodable image, a label out of range.

  Attributes:
    path: the file that holds the bad record (str), or None.
    record: the record index (the RecordIO key, or the source index), or None.
    offset: the byte offset of the record in ``path``, or None.
    reason: what is wrong, in words.
  """

  def __init__(self, reason: str, *, path=None, record=None, offset=None):
    self.path = None if path is None else str(path)
    self.record = record
    self.offset = offset
    self.reason = reason
    where = []
    if self.path is not None:
      where.append(f"file {self.path}")
    if record is not None:
      where.append(f"record {record}")
    if offset is not None:
      where.append(f"byte offset {offset}")
    super().__init__(f"{', '.join(where)}: {reason}" if where else reason)
