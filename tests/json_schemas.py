"""A corpus of JSON schemas, each with a chat prompt, for end-to-end tests of structured outputs.

Every schema is sized for the bundled model (SmolLM2-135M-Instruct): each string is bounded (maxLength,
enum, const, format or pattern), each number has a minimum and a maximum (and most non-integers a
multipleOf, else the model may write decimals at length), each array a maxItems, and every object is
closed (additionalProperties: false; an open object lets the model add keys of its own without end), so
a constrained reply closes within 256 tokens, greedy or sampled. Across the corpus the schemas cover
nested objects, arrays with minItems/maxItems, enum, const, anyOf, $ref/$defs, string patterns, inclusive
and exclusive numeric bounds, multipleOf, optional fields, booleans, nullable types, the string formats
date, email, uuid and ipv4, and one schema of more than 200 properties.

The prompts ask in plain words for the thing the schema describes; they do not spell out the schema, so
an unconstrained reply (prose, a code fence, other keys) mostly fails `validate`: that shows the
constraint at work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    schema: dict


def validate(schema: dict, text: str) -> None:
    """Parse `text` as JSON and check it against `schema`, formats included; raises on any failure
    (json.JSONDecodeError or jsonschema.ValidationError)."""
    instance = json.loads(text)
    jsonschema.validate(instance, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _text(max_length: int, min_length: int = 1) -> dict:
    return {"type": "string", "minLength": min_length, "maxLength": max_length}


def _int(minimum: int, maximum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object; every property is required unless `required` names a subset."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


_BOOL = {"type": "boolean"}

# The large schema: a smart-home settings profile, 3 required fields then 16 rooms x 13 optional settings.
_ROOMS = ["kitchen", "living_room", "dining_room", "hallway", "office", "garage", "laundry", "basement",
          "attic", "porch", "garden", "bedroom_1", "bedroom_2", "bedroom_3", "bathroom_1", "bathroom_2"]
_ROOM_SETTINGS = {
    "light_on": _BOOL, "light_level": _int(0, 10), "heating_on": _BOOL, "target_temp": _int(10, 30),
    "fan_speed": _int(0, 5), "blinds_open": _BOOL, "motion_sensor": _BOOL, "night_light": _BOOL,
    "speaker_volume": _int(0, 10), "door_locked": _BOOL, "window_alarm": _BOOL, "humidifier_on": _BOOL,
    "air_quality_alert": _BOOL,
}
_SMART_HOME = _object(
    {"home_name": _text(20), "mode": {"enum": ["home", "away", "night", "vacation"]},
     "temperature_unit": {"enum": ["celsius", "fahrenheit"]},
     **{f"{room}_{setting}": spec for room in _ROOMS for setting, spec in _ROOM_SETTINGS.items()}},
    required=["home_name", "mode", "temperature_unit"])

SCHEMAS: list[Case] = [
    Case("person",
         "Make up a person and describe them as JSON: their name, their age, and whether they are a student.",
         _object({"name": _text(24), "age": _int(0, 120), "is_student": _BOOL})),

    Case("mailing_address",
         "Give me a JSON record with a person's name and their full mailing address (street, city, postal "
         "code and country).",
         _object({"name": _text(24),
                  "address": _object({"street": _text(32), "city": _text(20),
                                      "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
                                      "country": {"enum": ["US", "CA", "GB", "DE", "FR", "ES", "IT"]}})})),

    Case("shopping_list",
         "Write a grocery shopping list in JSON: the store, and two to four items with how many of each to buy.",
         _object({"store": _text(20),
                  "items": {"type": "array", "minItems": 2, "maxItems": 4,
                            "items": _object({"item": _text(16), "quantity": _int(1, 12)})}})),

    Case("weather_report",
         "Report today's weather in Paris as JSON: temperature in Celsius, the sky condition, humidity and "
         "wind speed.",
         _object({"city": _text(20),
                  "temperature_c": {"type": "number", "minimum": -40, "maximum": 50, "multipleOf": 0.5},
                  "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "fog", "storm"]},
                  "humidity_percent": _int(0, 100), "wind_kph": _int(0, 150)})),

    Case("review_sentiment",
         "Classify the sentiment of this restaurant review as JSON with a confidence and a star rating: "
         "\"The pasta was cold and the waiter ignored us for half an hour.\"",
         _object({"sentiment": {"enum": ["positive", "negative", "neutral"]},
                  "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                  "stars": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 6}})),

    Case("event_invite",
         "Create a JSON invitation for a team lunch: a title, the date, the organizer's email address, and "
         "how many people are coming.",
         _object({"title": _text(30), "date": {"type": "string", "format": "date"},
                  "organizer_email": {"type": "string", "format": "email", "maxLength": 40},
                  "attendees": _int(1, 500)})),

    Case("emergency_contacts",
         "List my primary and emergency contacts as JSON, each with a name and an international phone number.",
         {"$defs": {"phone": {"type": "string", "pattern": "^\\+[0-9]{7,12}$"},
                    "contact": _object({"name": _text(24), "phone": {"$ref": "#/$defs/phone"}})},
          **_object({"primary": {"$ref": "#/$defs/contact"}, "emergency": {"$ref": "#/$defs/contact"}})}),

    Case("shape",
         "Describe one geometric shape as JSON: say what kind it is, give its dimensions, and its color.",
         _object({"shape": {"anyOf": [
             _object({"kind": {"const": "circle"}, "radius": _int(1, 100)}),
             _object({"kind": {"const": "rectangle"}, "width": _int(1, 100), "height": _int(1, 100)}),
             _object({"kind": {"const": "triangle"}, "base": _int(1, 100), "height": _int(1, 100)})]},
             "color": {"enum": ["red", "green", "blue", "yellow", "black", "white"]}})),

    Case("book",
         "Give me the catalogue record of a well-known novel as JSON: title, author, subtitle and series "
         "(null if it has none), year of publication and page count.",
         _object({"title": _text(40), "author": _text(30),
                  "subtitle": {"type": ["string", "null"], "maxLength": 30},
                  "series": {"type": ["string", "null"], "maxLength": 24},
                  "year": _int(1450, 2025), "pages": _int(1, 2000)})),

    Case("api_status",
         "What is the status of the payments API right now? Answer as a JSON status object.",
         _object({"api_version": {"const": "v2"}, "status": {"enum": ["ok", "degraded", "down"]},
                  "http_code": _int(100, 599), "maintenance": _BOOL})),

    Case("user_profile",
         "Sign me up: produce a JSON user profile with a lowercase username and, if you like, a display name, "
         "age, short bio and newsletter preference.",
         _object({"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$"},
                  "display_name": _text(24), "age": _int(13, 120), "bio": _text(60), "newsletter": _BOOL},
                 required=["username"])),

    Case("recipe",
         "Suggest a simple dinner recipe as JSON: the dish, servings, ingredients, whether it is vegetarian, "
         "its difficulty and the preparation time in minutes.",
         _object({"dish": _text(30), "servings": _int(1, 12),
                  "ingredients": {"type": "array", "minItems": 2, "maxItems": 5, "items": _text(20)},
                  "vegetarian": _BOOL, "difficulty": {"enum": ["easy", "medium", "hard"]},
                  "prep_minutes": _int(1, 240)})),

    Case("color",
         "Pick a color for a website's buttons and give it as JSON: its name, hex code and RGB values.",
         _object({"name": _text(16), "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                  "rgb": {"type": "array", "minItems": 3, "maxItems": 3, "items": _int(0, 255)}})),

    Case("flight_search",
         "Book me a flight from New York to London next month for two adults. Give the search as JSON with "
         "airport codes, departure date, passengers, cabin and whether it is a round trip.",
         _object({"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                  "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                  "departure_date": {"type": "string", "format": "date"}, "passengers": _int(1, 9),
                  "cabin": {"enum": ["economy", "premium", "business", "first"]}, "round_trip": _BOOL})),

    Case("tic_tac_toe",
         "Show a tic-tac-toe game in progress as JSON: the 3x3 board and whose turn it is next.",
         _object({"board": {"type": "array", "minItems": 3, "maxItems": 3,
                            "items": {"type": "array", "minItems": 3, "maxItems": 3,
                                      "items": {"enum": ["X", "O", "-"]}}},
                  "next_player": {"enum": ["X", "O"]}})),

    Case("landmark_location",
         "Where is the Eiffel Tower? Give its location as JSON with latitude, longitude and elevation in meters.",
         _object({"place": _text(30),
                  "latitude": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.25},
                  "longitude": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.25},
                  "elevation_m": _int(-500, 9000)})),

    Case("tool_call",
         "I need the weather forecast for Tokyo for the next three days, in Celsius. Write the call to the "
         "get_weather function as JSON.",
         _object({"name": {"const": "get_weather"},
                  "arguments": _object({"location": _text(30), "unit": {"enum": ["celsius", "fahrenheit"]},
                                        "days": _int(1, 7)})})),

    Case("server_inventory",
         "Add one web server to our inventory as JSON: its UUID, hostname, IPv4 address, port, role and "
         "whether it is healthy.",
         _object({"id": {"type": "string", "format": "uuid"},
                  "hostname": {"type": "string", "pattern": "^[a-z][a-z0-9-]{1,20}$"},
                  "ipv4": {"type": "string", "format": "ipv4"}, "port": _int(1, 65535),
                  "role": {"enum": ["web", "database", "cache", "worker"]}, "healthy": _BOOL})),

    Case("invoice",
         "Draft an invoice as JSON for a customer who bought office supplies: invoice number, the customer, "
         "the line items, whether it is paid, and any notes.",
         {"$defs": {"line": _object({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                     "qty": _int(1, 10), "unit_price_cents": _int(1, 100000)})},
          **_object({"invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
                     "customer": _object({"name": _text(24),
                                          "email": {"type": "string", "format": "email", "maxLength": 32}}),
                     "lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"$ref": "#/$defs/line"}},
                     "paid": _BOOL, "notes": {"type": ["string", "null"], "maxLength": 30}})}),

    Case("movie_review",
         "Review the movie Inception as JSON: a rating out of five, whether you recommend it, and optionally "
         "a few pros and cons.",
         _object({"movie": _text(30), "rating": _int(1, 5), "recommend": _BOOL,
                  "pros": {"type": "array", "maxItems": 3, "items": _text(30)},
                  "cons": {"type": "array", "maxItems": 3, "items": _text(30)}},
                 required=["movie", "rating", "recommend"])),

    Case("payment",
         "How did the customer pay for order 1042? Give the payment as JSON with the amount in cents and the "
         "payment method details.",
         _object({"amount_cents": _int(1, 1000000), "method": {"anyOf": [
             _object({"type": {"const": "card"}, "brand": {"enum": ["visa", "mastercard", "amex"]},
                      "last4": {"type": "string", "pattern": "^[0-9]{4}$"}}),
             _object({"type": {"const": "paypal"},
                      "email": {"type": "string", "format": "email", "maxLength": 40}}),
             _object({"type": {"const": "cash"}})]}})),

    Case("sensor_reading",
         "Report the latest reading of the greenhouse temperature sensor as JSON, including its unit; the "
         "sensor may be offline.",
         _object({"sensor": _text(20),
                  "reading": {"anyOf": [_int(-100, 100), {"enum": ["offline", "error"]}]},
                  "unit": {"type": ["string", "null"], "enum": ["C", "F", None]},
                  "battery_low": _BOOL})),

    Case("quiz",
         "Write a short multiple-choice quiz about the solar system as JSON, with one or two questions.",
         _object({"topic": _text(20),
                  "questions": {"type": "array", "minItems": 1, "maxItems": 2,
                                "items": _object({"question": _text(40),
                                                  "options": {"type": "array", "minItems": 2, "maxItems": 4,
                                                              "items": _text(12)},
                                                  "answer_index": _int(0, 3)})}})),

    Case("smart_home_settings",
         "Set up my smart home as JSON: give the home a name and choose a mode and a temperature unit.",
         _SMART_HOME),
]
