function (newDoc, oldDoc, userCtx, secObj) {
__PREAMBLE__
  var RESULTS = __RESULT_FIELDS__;
  function same(a, b) {
    if (a === b) { return true; }
    if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) {
      return false;
    }
    var k;
    for (k in a) { if (!(k in b) || !same(a[k], b[k])) { return false; } }
    for (k in b) { if (!(k in a)) { return false; } }
    return true;
  }
  var mine = me + '_cmd';
  if (!oldDoc || oldDoc._deleted) {
    refuse('node ' + me + ' may not create documents: code and commands come from a deployer');
  }
  if (String(oldDoc.type) !== mine) {
    refuse('node ' + me + ' may only add results to its own commands (type ' + mine +
           '), not change ' + newDoc._id);
  }
  if (newDoc._deleted) {
    // A revision holding a result (or a running mark) the node wrote: it
    // deletes it to resolve a conflict between two servers (conflicts.py),
    // and could write any result into it anyway.  A pending command stays.
    if (oldDoc.state !== undefined) { return; }
    refuse('node ' + me + ' may not delete ' + newDoc._id);
  }
  if (newDoc._attachments && !same(newDoc._attachments, oldDoc._attachments)) {
    refuse('node ' + me + ' may not change attachments of ' + newDoc._id);
  }
  var key;
  for (key in newDoc) {
    if (key.charAt(0) !== '_' && RESULTS.indexOf(key) === -1 && !same(newDoc[key], oldDoc[key])) {
      refuse('node ' + me + ' may only add result fields (' + RESULTS.join(', ') +
             ') to ' + newDoc._id + ', not change ' + key);
    }
  }
  for (key in oldDoc) {
    if (key.charAt(0) !== '_' && RESULTS.indexOf(key) === -1 && !(key in newDoc)) {
      refuse('node ' + me + ' may not remove ' + key + ' from ' + newDoc._id);
    }
  }
  if (newDoc.node !== undefined && String(newDoc.node) !== me) {
    refuse('node ' + me + ' may not write node: ' + newDoc.node);
  }
}
